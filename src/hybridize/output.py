"""Writing model folders safely: a temporary sibling folder renamed into place only when complete.

Used by `hybridize convert`, `hybridize export` and the final model of `hybridize distill`, so a crash, a refusal,
Ctrl-C or SIGTERM never leaves a half-written OUTPUT, an existing OUTPUT is replaced only by a finished one, and an
OUTPUT that is (or holds, or lies inside) one of the inputs is refused before anything is written. What kill -9
leaves behind (`.OUTPUT.tmp-PID`, `.OUTPUT.old-PID`) is cleaned up by the next run into the same parent folder.
"""

from __future__ import annotations

import math
import os
import re
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

GGUF_TMP_PREFIX = "hybridize-gguf-"  # + PID + "-" + random: the tokenizer files a GGUF source unpacks
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_GGUF_TMP = re.compile(rf"^{GGUF_TMP_PREFIX}(?P<pid>\d+)-")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_OUR_SUFFIXES = (".json", ".safetensors", ".jinja", ".model", ".txt")


def _looks_like_ours(path: Path, files: bool) -> bool:
    """A folder holding only what hybridize writes (model and tokenizer files, no subfolders); with `files`, a
    plain file too (inside a folder only hybridize writes to). Anything else is another program's, left alone."""
    if path.is_symlink():
        return False
    if path.is_file():
        return files
    try:
        return all(p.is_file() and p.name.endswith(_OUR_SUFFIXES) for p in path.iterdir())
    except OSError:
        return False


def remove_stale_temporaries(parent: Path, files: bool = False) -> list[Path]:
    """Remove what killed runs left in `parent`: `.NAME.tmp-PID` (an unfinished output), `hybridize-gguf-PID-*`
    (a GGUF source's unpacked tokenizer) of processes that no longer exist. A `.NAME.old-PID` is a previous output
    moved aside for a replacement: it is deleted when NAME exists, and renamed back to NAME when the kill came
    between the two renames. Only folders that hold nothing but model / tokenizer files are touched (`files`: also
    plain files, for folders only hybridize writes to). Returns the paths removed or restored. Only processes of
    this machine are known, so two machines must not write into one shared parent folder at the same time."""
    done: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        match = _SIBLING.match(entry.name) or _GGUF_TMP.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])) or not _looks_like_ours(entry, files):
            continue
        try:
            if match.re is _SIBLING and match["kind"] == "old" and not (parent / match["name"]).exists():
                entry.rename(parent / match["name"])
            else:
                _remove(entry)
        except OSError:
            continue
        done.append(entry)
    return done


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_an_input(output: str | Path, inputs: Iterable[str | Path | None], what: str = "OUTPUT") -> None:
    """Refuse an output that is, holds or lies inside an input (paths resolved: `..`, symlinks), so that
    `--force` can never delete or overwrite what is being read."""
    out = _real(output)
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue  # hub ids and the like: not a local path
        source = _real(given)
        if out == source or out in source.parents or source in out.parents:
            raise HybridizeError(
                f"{what} {output} is the input {given} (or holds it, or lies inside it): writing it would replace "
                f"what is being read; choose another {what}"
            )


def check_output_folder(output: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
                        what: str = "OUTPUT") -> Path:
    """`output` as an absolute path, once it is known that a folder can be written there: not an input, not there
    yet (unless `force`), its parent present. Commands call it before reading a large source."""
    output = Path(output).expanduser().absolute()
    check_not_an_input(output, inputs, what=what)
    if output.exists() and not force:
        raise HybridizeError(f"{output} already exists; pass --force (force=True) to replace it")
    if not output.parent.is_dir():
        raise HybridizeError(f"the parent folder of {output} does not exist")
    return output


@contextmanager
def atomic_output_folder(output: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()
                         ) -> Iterator[Path]:
    """Yield an empty temporary folder beside `output`; on success it becomes `output`, on failure it is removed.

    `inputs` are the paths the output is made from: an output that overlaps one of them is refused.
    """
    output = check_output_folder(output, force, inputs)
    remove_stale_temporaries(output.parent)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists() or output.is_symlink():  # replace only now, with a finished folder
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
        tmp.rename(output)
        if old is not None:
            _remove(old)  # a folder or a file (--force onto a file)
    except BaseException:
        _remove(tmp)
        raise


def copy_side_files(files: Iterable[Path], folder: Path, config) -> None:
    """Copy tokenizer / generation files into `folder`; write a generation config from `config` if none came."""
    for f in files:
        if f.name in TOKENIZER_FILES and f.is_file():
            shutil.copy2(f, folder / f.name)
    if not (folder / "generation_config.json").exists():
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.pad_token_id).save_pretrained(folder)


def json_safe(value):
    """`value` with every NaN / inf float replaced by None, so that strict JSON parsers accept it (Python's json
    writes NaN, which is not JSON). A dict that had such values gets `"non_finite": [their keys]`, saying why
    they are null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {k: json_safe(v) for k, v in value.items()}
        lost = [k for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
        if lost:
            out["non_finite"] = lost
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
