"""Rebuilds the offline assets of the smoke recipes (run from the repo root, ../shared beside it):

    python recipes/smoke/make_assets.py

tiny-qwen3/: a byte-level BPE tokenizer trained on DAPO-Math prompts and a 4-layer, 64-wide Qwen3
config with 2 heads of 32 (no weights: the recipes initialise them from a seed). tiny-qwen3-tied/:
the same with the LM head tied to the embeddings, as Qwen3-0.6B, 1.7B and 4B are. prompts.parquet:
64 DAPO-Math rows in the verl layout, with a `topic` column to route teachers by.
"""

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from oprd.testing import tiny_config, train_tokenizer

here = Path(__file__).parent
GEOMETRY = ("triangle", "circle", "square", "angle", "polygon", "radius", "rectangle")


def with_topic(rows: pa.Table) -> pa.Table:
    """A `topic` column (geometry | other, from the problem's words) that multi_teacher.yaml routes by."""
    texts = [m[0]["content"].lower() for m in rows.column("prompt").to_pylist()]
    return rows.append_column("topic", pa.array(["geometry" if any(w in t for w in GEOMETRY) else "other"
                                                 for t in texts]))


table = pq.read_table(Path("../shared/data/dapo_math_17k.parquet"))
texts = [m[0]["content"] for m in table.column("prompt").to_pylist()[:4000]]
tokenizer = train_tokenizer(texts, vocab_size=1024, out_dir=here / "tiny-qwen3")
config = tiny_config(  # head_dim 32: vLLM's CPU attention refuses 16, and every smoke recipe can run under vLLM
    len(tokenizer),
    num_heads=2,
    num_kv_heads=1,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
)
config.save_pretrained(here / "tiny-qwen3")
shutil.copytree(here / "tiny-qwen3", here / "tiny-qwen3-tied", dirs_exist_ok=True)
config.tie_word_embeddings = True
config.save_pretrained(here / "tiny-qwen3-tied")
pq.write_table(with_topic(table.slice(0, 64)), here / "prompts.parquet")
