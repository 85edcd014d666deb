"""The share of the tokens of held-out code (the nano model's held-out standard-library files) that a
pruned draft vocabulary of each size holds, a token outside it being one the draft can never
propose: ranked by the tokenizer's scores (special pieces and characters first, then pieces by BPE
merge order), and by counts over a corpus (the other files of Lib/json, Lib/email, Lib/asyncio and
Lib/unittest: none of them held out).
    python benchmarks/results/2026-12-07-cpu-draft-vocab/coverage.py OUT.json
"""
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

from gemforge.engine.drafters import draft_vocabulary
from gemforge.engine.tokenizer import Tokenizer

MODEL = Path(__file__).resolve().parents[3] / "models" / "nano-codegemma"


def main(out):
    tok = Tokenizer(MODEL / "tokenizer.model")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = json.loads((MODEL / "training.json").read_text())["heldout_files"]
    ids = [t for f in files if (root / f).exists() for t in tok.encode((root / f).read_text(errors="ignore"), add_bos=False)]
    corpus = Path(tempfile.mkdtemp())
    for pkg in ("json", "email", "asyncio", "unittest"):
        for f in sorted((root / pkg).rglob("*.py")):
            if str(f.relative_to(root)) not in files:
                (corpus / f"{pkg}-{f.name}").write_text(f.read_text(errors="ignore"))
    rows = []
    for size in (512, 1024, 2048, 4096, 8192):
        row = {"draft_vocab_size": size, "tokens": len(ids)}
        for name, keep in (("covered_by_scores", draft_vocabulary(tok, size)),
                           ("covered_by_corpus", draft_vocabulary(tok, size, corpus))):
            keep = set(keep)
            row[name] = round(sum(t in keep for t in ids) / len(ids), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
