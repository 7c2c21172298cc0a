"""gguf_compare.py A B [--types-only]: compares the tensors of two GGUF files.

Used by scripts/test-llama-cpp.sh to hold tune's quantized exports against the files llama.cpp's
llama-quantize writes from tune's own f32 GGUF. Prints one line per difference and a summary;
exits 1 when a tensor is missing from either file, or differs in type, shape or (without
--types-only) its bytes. Needs numpy and gguf only.
"""

import sys

import gguf


def tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    types_only = "--types-only" in sys.argv
    if len(args) != 2:
        sys.exit(__doc__)
    a, b = tensors(args[0]), tensors(args[1])
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {args[0] if name in a else args[1]}")
            bad += 1
            continue
        ta, tb = a[name], b[name]
        if ta.tensor_type != tb.tensor_type or list(ta.shape) != list(tb.shape):
            print(f"{name}: {ta.tensor_type.name}{list(ta.shape)} vs {tb.tensor_type.name}{list(tb.shape)}")
            bad += 1
            continue
        if not types_only:
            da, db = ta.data.tobytes(), tb.data.tobytes()
            if da != db:
                diff = sum(x != y for x, y in zip(da, db))
                print(f"{name} ({ta.tensor_type.name}): {diff} of {len(da)} bytes differ")
                bad += 1
    kinds = sorted({t.tensor_type.name for t in a.values()})
    what = "types and shapes" if types_only else "types, shapes and bytes"
    print(f"{len(a)} tensors ({', '.join(kinds)}): {len(a) - bad if bad <= len(a) else 0} equal in {what}, {bad} differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
