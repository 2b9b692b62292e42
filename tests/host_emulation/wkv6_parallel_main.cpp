// Runs the three launches of the parallel WKV6 forward on the host.
// Usage: wkv6_parallel DIR B T H N WITH_STATE; reads DIR/{r,k,v,w,u,s0}
// (float32, [B,T,H,N] / [H,N] / [B,H,N,N]), writes DIR/{y,s}.
// Built by tests/test_wkv6_parallel_host.py after the kernels' header.

namespace kw = keras_rwkv_wkv6;

static std::vector<float> read(const char* dir, const char* name, size_t n) {
  std::vector<float> v(n);
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "rb");
  if (!f || fread(v.data(), 4, n, f) != n) {
    fprintf(stderr, "cannot read %s\n", path);
    exit(2);
  }
  fclose(f);
  return v;
}

static void write(const char* dir, const char* name,
                  const std::vector<float>& v) {
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE* f = fopen(path, "wb");
  fwrite(v.data(), 4, v.size(), f);
  fclose(f);
}

template <int N>
static void run(const char* dir, int B, int T, int H, bool with_state) {
  using D = kw::par::Dims<N>;
  const size_t seq = static_cast<size_t>(B) * T * H * N;
  const size_t states = static_cast<size_t>(B) * H * N * N;
  auto r = read(dir, "r", seq), k = read(dir, "k", seq);
  auto v = read(dir, "v", seq), w = read(dir, "w", seq);
  auto u = read(dir, "u", static_cast<size_t>(H) * N);
  auto s0 = read(dir, "s0", states);
  std::vector<float> y(seq, NAN), s(states, NAN);
  kw::Params p = {};
  p.B = B, p.T = T, p.H = H;
  p.r = r.data(), p.k = k.data(), p.v = v.data();
  p.log_w = w.data(), p.u = u.data();
  p.s0 = with_state ? s0.data() : nullptr;
  p.s0_bstride = static_cast<int64_t>(H) * N * N;
  p.y = y.data(), p.s_out = s.data();
  const int nc = kw::par::chunks(p, N);
  std::vector<float> scratch(kw::par::scratch_bytes(p, N) / 4, NAN);
  float* sc = scratch.data();
  const int threads = kw::par::kThreads;
  host_grid(B * H, nc, threads, D::kStates, [&] {
    kw::par::chunk_states_kernel<float, N>(p, sc, nc);
  });
  const int64_t entries = static_cast<int64_t>(states);
  host_grid((entries + 255) / 256, 1, 256, 0,
            [&] { kw::par::pass_states_kernel<N>(p, sc, nc); });
  host_grid(B * H, nc, threads, D::kOutputs, [&] {
    kw::par::chunk_outputs_kernel<float, N>(p, sc, nc);
  });
  write(dir, "y", y);
  write(dir, "s", s);
}

int main(int argc, char** argv) {
  if (argc != 7) return 2;
  const char* dir = argv[1];
  const int B = atoi(argv[2]), T = atoi(argv[3]), H = atoi(argv[4]);
  const int N = atoi(argv[5]);
  const bool with_state = atoi(argv[6]) != 0;
  switch (N) {
    case 16: run<16>(dir, B, T, H, with_state); break;
    case 32: run<32>(dir, B, T, H, with_state); break;
    case 64: run<64>(dir, B, T, H, with_state); break;
    case 128: run<128>(dir, B, T, H, with_state); break;
    default: return 2;
  }
  return 0;
}
