"""grok-convert verify: check a conversion against its record, and optionally against the source.

Without the source: every shard's sha256 and config.json's hash against ``grok_convert.json``, and
that the output loads -- the index names exactly the tensors the config and options call for, and
every shard header holds them with the planned dtype, shape and contiguous offsets.
With ``--src``: the source files' names and sizes, and every tensor re-derived from the source and
compared byte for byte with the shards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from grok_torch.config import GrokConfig
from grok_torch.convert.convert import (INDEX_FILE, RECORD_FILE, ConvertError, _file_sha256, _Progress,
                                        find_ckpt_dir, plan_tensors, read_source, tensor_chunks)
from grok_torch.convert.safetensors_io import ST_DTYPES, OutTensor, read_header
from grok_torch.convert.weight_map import param_order

def verify_conversion(out: "str | os.PathLike", src: "str | os.PathLike | None" = None, *,
                      quiet: bool = False) -> List[str]:
    """Check a conversion; returns the list of problems (empty = verified).

    Re-hashes every shard and config.json against the record, and checks that the output loads:
    the index names exactly the tensors the config and options call for, and every shard header
    holds them with the planned dtype, shape and contiguous offsets. With ``src``, also checks the
    source files and re-derives every tensor from them.
    """
    out = Path(out)
    rec_path = out / RECORD_FILE
    if not out.exists():
        raise ConvertError(f"{out} does not exist: pass the OUT directory of a finished grok-convert run")
    if not out.is_dir():
        raise ConvertError(f"{out} is not a directory: pass the OUT directory of a finished grok-convert run")
    if not rec_path.exists():
        raise ConvertError(f"{out}: no {RECORD_FILE}; is this a finished grok-convert output?")
    try:
        record = json.loads(rec_path.read_text())
        shard_records = {r["file"]: r for r in record["shards"]}
        options = record["options"]
        [(r["size"], r["sha256"]) for r in shard_records.values()]
    except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{rec_path} is unreadable ({type(e).__name__}: {e})") from None
    problems: List[str] = []
    progress = _Progress(sum(r["size"] for r in shard_records.values()), 0, quiet, desc="grok-convert verify")
    try:
        for f, r in shard_records.items():
            p = out / f
            if not p.exists():
                problems.append(f"{f}: missing")
            elif p.stat().st_size != r["size"]:
                problems.append(f"{f}: size {p.stat().st_size}, recorded {r['size']}")
            else:
                digest = _file_sha256(p, progress)
                if digest != r["sha256"]:
                    problems.append(f"{f}: sha256 {digest} differs from the recorded {r['sha256']}")
    finally:
        progress.close()
    cfg_path = out / "config.json"
    if not cfg_path.exists():
        return problems + ["config.json is missing"]
    if record.get("config_sha256") and _file_sha256(cfg_path) != record["config_sha256"]:
        problems.append("config.json differs from the one written by the conversion")
    try:
        cfg = GrokConfig.from_json(cfg_path)
    except ValueError as e:
        return problems + [f"config.json: {e}"]
    planned = {t.name: t for t in plan_tensors(param_order(cfg), options["dtype"], options["plain_dtype"])}
    index = _read_index(out, problems)
    if index is None:
        return problems
    missing = sorted(set(planned) - set(index))
    extra = sorted(set(index) - set(planned))
    if missing or extra:
        problems.append(f"{INDEX_FILE} does not name the tensors of this conversion (missing: "
                        f"{', '.join(missing[:5]) or '-'}; unexpected: {', '.join(extra[:5]) or '-'})")
    stray = sorted(set(index.values()) - set(shard_records))
    if stray:
        problems.append(f"{INDEX_FILE} names shards not in the record: {', '.join(stray)}")
    for f in shard_records:
        if (out / f).exists():
            problems += _check_shard_header(out / f, planned, {n for n, g in index.items() if g == f})
    if src is not None and not problems:
        problems += _verify_against_source(out, Path(src), record, cfg, planned, index, quiet)
    return problems


def _read_index(out: Path, problems: List[str]) -> Optional[Dict[str, str]]:
    """weight_map of the index, or None (with the problem recorded)."""
    try:
        index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
        if not isinstance(index, dict):
            raise TypeError("weight_map is not an object")
        return index
    except FileNotFoundError:
        problems.append(f"{INDEX_FILE} is missing")
    except (ValueError, KeyError, TypeError) as e:
        problems.append(f"{INDEX_FILE} is malformed ({type(e).__name__}: {e})")
    return None


def _check_shard_header(path: Path, planned: Dict[str, OutTensor], names: set) -> List[str]:
    """The shard holds exactly ``names``, each with the planned dtype and shape, contiguously."""
    try:
        start, header = read_header(str(path))
    except (ValueError, OSError) as e:
        return [f"{path.name}: unreadable safetensors header ({e})"]
    header.pop("__metadata__", None)
    problems = []
    if set(header) != names:
        problems.append(f"{path.name}: holds {sorted(set(header) - names)[:3]} beyond the index, "
                        f"lacks {sorted(names - set(header))[:3]}")
    end = start
    for name, h in sorted(header.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0]):
        t = planned.get(name)
        if t is None:
            continue
        if h.get("dtype") != ST_DTYPES[t.dtype] or h.get("shape") != list(t.shape):
            problems.append(f"{path.name}: {name} is {h.get('dtype')} {h.get('shape')}, "
                            f"expected {ST_DTYPES[t.dtype]} {list(t.shape)}")
        b, e = h.get("data_offsets", [None, None])
        if b != end - start or e != b + t.nbytes:
            problems.append(f"{path.name}: {name} has data offsets {h.get('data_offsets')}, expected "
                            f"[{end - start}, {end - start + t.nbytes}]")
        end = start + (e if isinstance(e, int) else 0)
    if end != path.stat().st_size:
        problems.append(f"{path.name}: data ends at byte {end}, the file has {path.stat().st_size}")
    return problems


def _verify_against_source(out: Path, src: Path, record: dict, cfg: GrokConfig, planned: Dict[str, OutTensor],
                           index: Dict[str, str], quiet: bool) -> List[str]:
    """Runs after the index and headers matched the plan: compares every tensor's bytes with its
    conversion re-derived from the source."""
    problems: List[str] = []
    ckpt = find_ckpt_dir(src)
    for f in record["source"]["files"]:
        p = ckpt / f["name"]
        if not p.exists():
            problems.append(f"source {p}: missing")
        elif p.stat().st_size != f["size"]:
            problems.append(f"source {p}: size {p.stat().st_size}, recorded {f['size']}")
    if problems:
        return problems
    _, _, refs = read_source(ckpt, cfg.replace(weight_format="int8"))
    by_shard: Dict[str, List[str]] = {}
    for name, f in index.items():
        by_shard.setdefault(f, []).append(name)
    progress = _Progress(sum(t.nbytes for t in planned.values()), 0, quiet, desc="grok-convert verify --src")
    try:
        for shard_file, names in sorted(by_shard.items()):
            start, header = read_header(str(out / shard_file))
            with open(out / shard_file, "rb") as fh:
                for name in names:
                    t = planned[name]
                    fh.seek(start + header[name]["data_offsets"][0])
                    for piece in tensor_chunks(t, refs[t.source_index], 1 << 26):
                        progress(len(piece))
                        if fh.read(len(piece)) != bytes(piece):
                            problems.append(f"{shard_file}: {name} differs from its conversion of "
                                            f"{ckpt / f'tensor{t.source_index:05d}_000'}")
                            break
    finally:
        progress.close()
    return problems
