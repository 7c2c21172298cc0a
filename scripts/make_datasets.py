#!/usr/bin/env python3
"""Build the small sample data sets in datasets/ from public source files.

    make_datasets.py RAW_DIR [OUT_DIR]     (OUT_DIR defaults to datasets/ of this repo)

This documents how every file in datasets/ was made; it is not run by CI. RAW_DIR
must hold the source files below, byte for byte (their sha256 is checked). Each is a
file of a public GitHub repository at the given commit; e.g. with a clone of the
repository, `git show COMMIT:PATH > RAW_DIR/NAME`.

Selection is deterministic: records are taken in source order, the first N that
pass the filters (English, short enough for a 135M model at max_seq_len 256-512),
and train/test splits are by position (every 10th item goes to test), so the same
inputs always give the same outputs. Only standard-library Python is needed.

Output formats (JSON lines, UTF-8, one record per line):
  alpaca: {"instruction": str, "input": str, "output": str}
  chat:   {"messages": [{"role": "user"|"assistant", "content": str}, ...]}
  text:   {"text": str}
"""
import hashlib
import json
import sys
import unicodedata
from pathlib import Path

SOURCES = {
    # Stanford Alpaca, cleaned by gururise/AlpacaDataCleaned (CC BY-NC 4.0): a 1000-record
    # excerpt of alpaca_data_cleaned.json committed to lm-sys/FastChat (pull request #2000).
    "alpaca_data_cleaned_1000.json": (
        "lm-sys/FastChat", "04a1074d71ea66467d5fee6f1dde344efc012218",
        "data/alpaca_data_cleaned_1000.json",
        "858a146c0a95e8893d2584010ef8958638aab7442d3f96e1dc07bef285806320"),
    # 100 English OpenAssistant conversation trees (Apache-2.0), exported by the
    # Open-Assistant project for its manual model evaluation.
    "oa_en_100_tree.jsonl": (
        "LAION-AI/Open-Assistant", "f1e6ed9526f5817531f3ab85441a40b3671ddccb",
        "model/model_eval/manual/data/en_100_tree.jsonl",
        "a27639214a5098bf9e1cc62a855c85c630b64ab48ee94655e7f6046438b0aedb"),
    # GSM8K, grade-school math word problems (MIT), OpenAI.
    "gsm8k_train.jsonl": (
        "openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
        "grade_school_math/data/train.jsonl",
        "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
    "gsm8k_test.jsonl": (
        "openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
        "grade_school_math/data/test.jsonl",
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    # FastChat's hard-coded identity conversations ("I am Vicuna ... LMSYS"), Apache-2.0,
    # produced by fastchat/data/hardcoded_questions.py.
    "dummy_conversation.json": (
        "lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        "data/dummy_conversation.json",
        "534c5a1079f2eb61ff96633330ce87c4743f5b6d5b1691b44a65920473540470"),
    # Tiny Shakespeare (public-domain text), from karpathy/char-rnn.
    "tinyshakespeare.txt": (
        "karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
        "data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}


def load_raw(raw, name):
    repo, commit, path, want = SOURCES[name]
    data = (raw / name).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        sys.exit(f"{name}: sha256 {got}, expected {want} ({repo} {commit}:{path})")
    return data.decode("utf-8")


def is_english(text):
    """No letters outside the Latin script (a cheap guard against other languages)."""
    for ch in text:
        if ch.isalpha() and not unicodedata.name(ch, "").startswith("LATIN"):
            return False
    return True


def split(records, every=10):
    """Deterministic 90/10 split by position: item i goes to test when i % every == every - 1."""
    train = [r for i, r in enumerate(records) if i % every != every - 1]
    test = [r for i, r in enumerate(records) if i % every == every - 1]
    return train, test


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{path}: {len(records)} records, {path.stat().st_size} bytes", file=sys.stderr)


def alpaca_cleaned(raw, limit=400, max_chars=1000):
    out = []
    for r in json.loads(load_raw(raw, "alpaca_data_cleaned_1000.json")):
        rec = {k: r[k].strip() for k in ("instruction", "input", "output")}
        text = rec["instruction"] + rec["input"] + rec["output"]
        if not rec["instruction"] or not rec["output"] or len(text) >= max_chars:
            continue
        if not is_english(text) or "translat" in rec["instruction"].lower():
            continue
        out.append(rec)
        if len(out) == limit:
            break
    return out


def oasst_conversations(raw, max_chars=1200):
    """Every root-to-assistant path of the trees whose messages are all English, not
    deleted, passed review and human-written, and whose total text is < max_chars.
    Returns a list of (tree_index, conversation)."""

    def usable(m):
        return (m.get("lang") == "en" and not m.get("deleted")
                and m.get("review_result") is True and not m.get("synthetic"))

    role = {"prompter": "user", "assistant": "assistant"}
    out = []
    lines = load_raw(raw, "oa_en_100_tree.jsonl").splitlines()
    for tree_index, line in enumerate(lines):
        tree = json.loads(line)

        def walk(msg, path):
            if not usable(msg):
                return
            path = path + [{"role": role[msg["role"]], "content": msg["text"].strip()}]
            if path[-1]["role"] == "assistant" and sum(len(m["content"]) for m in path) < max_chars:
                out.append((tree_index, {"messages": path}))
            for reply in sorted(msg.get("replies", []), key=lambda r: (r.get("rank") is None, r.get("rank"))):
                walk(reply, path)

        walk(tree["prompt"], [])
    return out


def gsm8k(raw, name, limit, max_chars=700):
    out = []
    for line in load_raw(raw, name).splitlines():
        r = json.loads(line)
        if len(r["question"]) + len(r["answer"]) >= max_chars:
            continue
        out.append({"instruction": r["question"].strip(), "input": "", "output": r["answer"].strip()})
        if len(out) == limit:
            break
    return out


def identity(raw):
    role = {"human": "user", "gpt": "assistant"}
    return [
        {"messages": [{"role": role[t["from"]], "content": t["value"]} for t in c["conversations"]]}
        for c in json.loads(load_raw(raw, "dummy_conversation.json"))
    ]


def shakespeare(raw, limit=300, target_chars=400, max_chars=1000):
    """Consecutive speeches ("Speaker:\nlines", separated by blank lines) from the start of
    the text, grouped into passages of up to about `target_chars` characters (a single
    longer speech stands alone; one of `max_chars` or more is left out); the first
    `limit` passages."""
    out, passage = [], []
    for block in load_raw(raw, "tinyshakespeare.txt").split("\n\n"):
        block = block.strip()
        if not block or len(block) >= max_chars:
            continue
        if passage and len("\n\n".join(passage + [block])) > target_chars:
            out.append({"text": "\n\n".join(passage)})
            passage = []
            if len(out) == limit:
                return out
        passage.append(block)
    if passage and len(out) < limit:
        out.append({"text": "\n\n".join(passage)})
    return out


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    raw = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).resolve().parent.parent / "datasets"
    out.mkdir(parents=True, exist_ok=True)

    # (a) instruction data, Alpaca format
    recs = alpaca_cleaned(raw)
    write_jsonl(out / "alpaca_cleaned.jsonl", recs)
    train, test = split(recs)
    write_jsonl(out / "alpaca_cleaned.train.jsonl", train)
    write_jsonl(out / "alpaca_cleaned.test.jsonl", test)

    # (b) chat data; split by tree so that no test prompt is seen in training
    convs = oasst_conversations(raw)
    write_jsonl(out / "oasst.jsonl", [c for _, c in convs])
    write_jsonl(out / "oasst.train.jsonl", [c for t, c in convs if t % 10 != 9])
    write_jsonl(out / "oasst.test.jsonl", [c for t, c in convs if t % 10 == 9])

    # (c) plain text
    recs = shakespeare(raw)
    write_jsonl(out / "shakespeare.jsonl", recs)
    train, test = split(recs)
    write_jsonl(out / "shakespeare.train.jsonl", train)
    write_jsonl(out / "shakespeare.test.jsonl", test)

    # demo sets with a distinctive, quickly learned style
    write_jsonl(out / "gsm8k.train.jsonl", gsm8k(raw, "gsm8k_train.jsonl", 300))
    write_jsonl(out / "gsm8k.test.jsonl", gsm8k(raw, "gsm8k_test.jsonl", 30))
    train, test = split(identity(raw))
    write_jsonl(out / "identity.train.jsonl", train)
    write_jsonl(out / "identity.test.jsonl", test)


if __name__ == "__main__":
    main()
