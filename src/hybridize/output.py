"""Writing model folders safely: a temporary sibling folder renamed into place only when complete.

Used by `hybridize convert` and `hybridize export`, so a crash, a refusal or Ctrl-C never leaves a half-written
OUTPUT (and an existing OUTPUT is replaced only by a finished one).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import GenerationConfig

from .errors import HybridizeError

# Files besides weights and config.json that make a model folder usable (tokenizer, chat template, generation).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip


@contextmanager
def atomic_output_folder(output: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `output`; on success it becomes `output`, on failure it is removed."""
    output = Path(output).expanduser().absolute()
    if output.exists() and not force:
        raise HybridizeError(f"{output} already exists; pass --force (force=True) to replace it")
    if not output.parent.is_dir():
        raise HybridizeError(f"the parent folder of {output} does not exist")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists():  # replace only now, with a finished folder
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
        tmp.rename(output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(files: Iterable[Path], folder: Path, config) -> None:
    """Copy tokenizer / generation files into `folder`; write a generation config from `config` if none came."""
    for f in files:
        if f.name in TOKENIZER_FILES and f.is_file():
            shutil.copy2(f, folder / f.name)
    if not (folder / "generation_config.json").exists():
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(folder)
