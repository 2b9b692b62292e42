// Runs the launches of the parallel WKV6 forward, then of its backward,
// on the host. Usage: wkv6_parallel DIR B T H N WITH_STATE; reads
// DIR/{r,k,v,w,u,s0,dy,gs} (float32, [B,T,H,N] / [H,N] / [B,H,N,N]),
// writes DIR/{y,s} and DIR/{dr,dk,dv,p,q,du,ds0} (the per-step backward's
// outputs: P and Q the running sums of dlog_w, du per batch row).
// Built by tests/test_wkv6_parallel_host.py after the kernels' headers.

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
  constexpr int L = kw::par::kFwdLen<N>;
  using D = kw::par::Dims<N, L>;
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
  const int nc = kw::par::chunks(p, L);
  std::vector<float> scratch(kw::par::forward_scratch_bytes(p, N) / 4, NAN);
  float* sc = scratch.data();
  const int threads = kw::par::kThreads;
  host_grid(B * H, nc, 1, threads, D::kTerms, [&] {
    kw::par::chunk_terms_kernel<float, N, L>(p, sc, nullptr, nc);
  });
  const int64_t entries = static_cast<int64_t>(states);
  host_grid((entries + 255) / 256, 1, 1, 256, 0, [&] {
    kw::par::pass_states_kernel<N>(p, sc, nullptr, nc);
  });
  host_grid(B * H, nc, 1, threads, D::kOutputs, [&] {
    kw::par::chunk_outputs_kernel<float, N>(p, sc, nc);
  });
  write(dir, "y", y);
  write(dir, "s", s);

  constexpr int LB = kw::par::kBwdLen<N>;
  auto dy = read(dir, "dy", seq), gs = read(dir, "gs", states);
  std::vector<float> dr(seq, NAN), dk(seq, NAN), dv(seq, NAN);
  std::vector<float> pp(seq, NAN), qq(seq, NAN);
  std::vector<float> du(static_cast<size_t>(B) * H * N, NAN);
  std::vector<float> ds0(states, NAN);
  p.dy = dy.data(), p.gs = gs.data(), p.s_T = s.data();
  p.dr = dr.data(), p.dk = dk.data(), p.dv = dv.data();
  p.p = pp.data(), p.q = qq.data(), p.du_part = du.data();
  p.ds0 = ds0.data();
  p.s_out = nullptr;
  const int nb = kw::par::chunks(p, LB);
  std::vector<float> bwd(kw::par::backward_scratch_bytes(p, N) / 4, NAN);
  p.scratch = bwd.data();
  const kw::par::BwdScratch<N> sc2(p, nb);
  host_grid(B * H, nb, 2, threads, kw::par::Dims<N, LB>::kTerms, [&] {
    kw::par::chunk_terms_kernel<float, N, LB>(p, sc2.states, sc2.grads, nb);
  });
  host_grid((entries + 255) / 256, 2, 1, 256, 0, [&] {
    kw::par::pass_states_kernel<N>(p, sc2.states, sc2.grads, nb);
  });
  host_grid(B * H, nb, 1, threads, kw::par::BwdDims<N, LB>::kGrads,
            [&] { kw::par::chunk_grads_kernel<float, N>(p, nb); });
  host_grid((B * H * N + 255) / 256, 1, 1, 256, 0, [&] {
    kw::par::carries_kernel<N>(p, sc2.sums, nb);
  });
  host_grid(B * H, nb, 1, threads, 0, [&] {
    kw::par::add_carries_kernel<N, LB>(p, sc2.sums, nb);
  });
  write(dir, "dr", dr);
  write(dir, "dk", dk);
  write(dir, "dv", dv);
  write(dir, "p", pp);
  write(dir, "q", qq);
  write(dir, "du", du);
  write(dir, "ds0", ds0);
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
