"""The RWKV World vocabulary file: `<id> <literal> <byte length>` lines.

Read without executing anything (`ast.literal_eval` evaluates literals
only), written back in the same form.
"""

import ast


def load_vocabulary_file(path):
    """Reads an RWKV World vocabulary file.

    Each line is `<id> <Python literal of str or bytes> <byte length>`, ids
    1, 2, 3, ... in order. Literals are parsed with `ast.literal_eval`,
    which evaluates literals only, never code.

    Returns:
        The tokens as bytes, token id `i` at index `i - 1`.
    """
    tokens = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for line_no, line in enumerate(lines, start=1):
        try:
            first, last = line.index(" "), line.rindex(" ")
            token_id = int(line[:first])
            literal = line[first + 1 : last]
            body = literal[1:-1]
            if (
                len(literal) >= 2
                and literal[0] == literal[-1] == "'"
                and "\\" not in body
                and "'" not in body
            ):
                # A plain '...' literal (most lines): 6x faster than
                # literal_eval, which reads the rest.
                token = body
            else:
                token = ast.literal_eval(literal)
            if isinstance(token, str):
                token = token.encode("utf-8")
            length = int(line[last:])
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"{path}, line {line_no}: not a vocabulary line "
                f"(`<id> <literal> <length>`): {line[:60]!r}"
            ) from e
        if not isinstance(token, bytes) or len(token) != length:
            raise ValueError(
                f"{path}, line {line_no}: token length does not match."
            )
        if token_id != line_no:
            raise ValueError(
                f"{path}, line {line_no}: ids must be 1, 2, 3, ... in "
                f"order; found {token_id}."
            )
        tokens.append(token)
    return tokens


def vocabulary_line(token_id, token):
    """One line of a vocabulary file, as `load_vocabulary_file` reads it."""
    try:
        literal = repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        literal = repr(token)
    return f"{token_id} {literal} {len(token)}\n"
