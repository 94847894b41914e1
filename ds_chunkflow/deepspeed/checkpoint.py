"""Crash-safe checkpoints on DeepSpeed's layout: a manifest marks a tag complete, ``latest`` moves last.

Save (:func:`save_checkpoint`, used by both ChunkFlow engines through ``ChunkFlowMixin``):

1. rank 0 removes the tag's old manifest (a tag being rewritten is incomplete until it is done);
2. DeepSpeed's own ``save_checkpoint(..., save_latest=False)`` writes its usual files, while every file its
   checkpoint writer saves is recorded (:func:`~ds_chunkflow.deepspeed.deepspeed_adapter.recording_checkpoint_saves`),
   so each rank knows the files it wrote;
3. every rank fsyncs its files and the directories they are in; the lists (path, size, rank) are
   gathered on rank 0 (a collective, hence also a barrier over all ranks);
4. rank 0 writes ``<tag>/ds_chunkflow_complete.json`` (files, sizes, world size, global step) and then
   ``latest``, each atomically (temporary file in the same directory, fsync, ``os.replace``, fsync
   of the directory); a final barrier.

So a kill at any moment leaves ``latest`` either at the previous tag or at a complete new one, and a
tag without a manifest is known to be incomplete. Rank 0 also marks the tag ``ds_chunkflow_saving``
before step 1 and removes the mark after step 4, so a torn ChunkFlow save never passes for a stock one.
The layout is DeepSpeed's: stock tools (``zero_to_fp32.py``, ``load_checkpoint(tag=...)``) read it as
before; the manifest (and, while saving, the mark) is one more file.

Load (:func:`resolve_tag`): ``latest`` is used if the tag it names is complete (manifest present,
every listed file present with its listed size, ``.pt`` zip archives with an intact central
directory). Otherwise the newest complete tag by the manifest's global step is used, with a warning
naming each tag skipped and why. A damaged tag is never used; no complete tag at all is an error
naming the directory and what was found. Rank 0 decides and broadcasts; every rank then checks its
own files of the chosen tag, and any failure is raised on all ranks.

Stock DeepSpeed tags (no manifest, no saving mark: e.g. a run to warm-start from) are loadable when
complete by DeepSpeed's own standard (:func:`check_stock_tag`: the model states file names the data-
and model-parallel world sizes, and every rank's ``*model_states.pt`` / ``*optim_states.pt`` it implies
is present and a readable zip), with a warning; they carry no data-sampler position
(:func:`restore_sampler`). They are chosen automatically only in a directory holding no ChunkFlow tag at
all; in a ChunkFlow directory a manifest-less tag is a torn save, loadable only as an explicit ``tag``.

Retention (:mod:`ds_chunkflow.deepspeed.retention`) renames a tag to ``.ds_chunkflow_deleting.<tag>`` before it deletes
anything in it; such a directory is never a tag here (:func:`is_trash`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ds_chunkflow.deepspeed.deepspeed_adapter import checkpoint_writes_async, recording_checkpoint_saves
from ds_chunkflow.deepspeed.distributed import all_reduce

MANIFEST = "ds_chunkflow_complete.json"
SAVING = "ds_chunkflow_saving"  # a ChunkFlow save of this tag started and has not finished
LATEST = "latest"
FORMAT = 1
TRASH_PREFIX = ".ds_chunkflow_deleting."  # a tag being deleted (ds_chunkflow.deepspeed.retention): never a tag to load


def is_trash(name: str) -> bool:
    """``name`` is a tag directory renamed for deletion by
    :func:`ds_chunkflow.deepspeed.retention.prune_checkpoints`."""
    return name.startswith(TRASH_PREFIX)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for (missing, incomplete or damaged)."""


@dataclass
class Resolved:
    """The tag chosen by :func:`find_complete_tag` and what was skipped on the way."""

    tag: str | None
    step: int | None = None
    skipped: list[str] = field(default_factory=list)  # one line per tag not used: "tag: reason"
    found: str = ""  # what the directory held, for error messages
    stock: bool = False  # written by plain DeepSpeed: no manifest, no data-sampler position


# ----------------------------------------------------------------------------- durable writes
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so a reader sees the old content or the whole new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(directory)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, ds_save, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):
    """Crash-safe save around ``ds_save`` (DeepSpeed's ``save_checkpoint`` of ``engine``); see the module doc."""
    save_dir = os.fspath(save_dir)
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    if checkpoint_writes_async(engine):  # asynchronous writers: files are not done when save returns
        warnings.warn("ds_chunkflow: a decoupled checkpoint engine is not made crash-safe; saving as DeepSpeed does")
        return ds_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)
    rank, world = _rank(), _world()
    tag_dir = os.path.join(save_dir, tag)
    if rank == 0:  # rewriting a tag: incomplete until its new manifest is written (DeepSpeed barriers first)
        os.makedirs(tag_dir, exist_ok=True)
        atomic_write_text(os.path.join(tag_dir, SAVING), f"{engine.global_steps}\n")  # before the manifest goes
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tag_dir, MANIFEST))
            _fsync_path(tag_dir)
    with recording_checkpoint_saves(engine) as written:
        result = ds_save(save_dir, tag=tag, client_state=client_state, save_latest=False, **kwargs)
    mine = []
    for path in dict.fromkeys(written):
        _fsync_path(path)
        rel = os.path.relpath(path, tag_dir)
        if rel.startswith(os.pardir):
            continue  # written outside the tag directory: not part of this tag
        mine.append({"path": rel, "size": os.path.getsize(path), "rank": rank, "zip": zipfile.is_zipfile(path)})
    for d in {os.path.dirname(p) for p in written}:
        _fsync_path(d)
    everyone = [mine]
    if dist.is_initialized():  # also the barrier: every rank's files are written and durable after this
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    if rank == 0:
        files = sorted((f for per_rank in everyone for f in per_rank), key=lambda f: (f["path"], f["rank"]))
        manifest = {"format": FORMAT, "tag": tag, "global_step": int(engine.global_steps),
                    "global_samples": int(getattr(engine, "global_samples", 0)), "world_size": world, "files": files}
        atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
        with contextlib.suppress(FileNotFoundError):  # after the manifest: never neither of the two
            os.unlink(os.path.join(tag_dir, SAVING))
        if save_latest:
            atomic_write_text(os.path.join(save_dir, LATEST), tag)
    _barrier()  # no rank goes on before `latest` names the complete tag
    return result


# ----------------------------------------------------------------------------- validation
def _read_manifest(tag_dir: str) -> tuple[dict | None, str | None]:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return None, f"no manifest ({MANIFEST}): the save did not finish, or it was not written by ds_chunkflow"
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), list) or "global_step" not in manifest:
            raise ValueError("fields missing")
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest {MANIFEST}: {e}"
    if not manifest["files"]:
        return None, f"manifest {MANIFEST} lists no files"
    return manifest, None


def _check_file(tag_dir: str, entry: dict) -> str | None:
    path = os.path.join(tag_dir, entry["path"])
    who = f"of rank {entry.get('rank', '?')}"
    if not os.path.isfile(path):
        return f"missing file {entry['path']} {who}"
    size = os.path.getsize(path)
    if entry["size"] is not None and size != entry["size"]:
        return f"truncated file {entry['path']} {who}: {size} bytes, the manifest says {entry['size']}"
    if entry.get("zip") and not zipfile.is_zipfile(path):
        return f"damaged file {entry['path']} {who}: not a readable zip archive"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"unreadable file {entry['path']} {who}: {e}"
    return None


_MODEL_STATES = re.compile(r"^(zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _stock_expected(names: set[str], dp: int, mp: int) -> list[tuple[str, int]]:
    """(file, data-parallel rank) of every rank file DeepSpeed writes for ``dp`` x ``mp`` ranks, judging
    the ZeRO stage and bf16 prefix by the files present (ZeRO-3: per-rank model states; ZeRO >= 1: optim)."""
    matches = [m for m in map(_MODEL_STATES.match, names) if m]
    if any(m.group(1) for m in matches):  # ZeRO-3: one model states file per data-parallel rank
        expected = [(f"zero_pp_rank_{d}_mp_rank_{m:02d}_model_states.pt", d) for d in range(dp) for m in range(mp)]
    else:
        expected = [(f"mp_rank_{m:02d}_model_states.pt", -1) for m in range(mp)]  # read by every rank
    optim = [m for m in map(_OPTIM_STATES.match, names) if m]
    if optim:
        prefix = "bf16_" if any(m.group(1) for m in optim) else ""
        expected += [(f"{prefix}zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt", d)
                     for d in range(dp) for m in range(mp)]
    return expected


def check_stock_tag(tag_dir: str, rank: int | None = None) -> tuple[dict | None, str | None]:
    """``(info, None)`` if ``tag_dir`` is a complete tag by DeepSpeed's own standard, else ``(None, reason)``.

    Complete: no ChunkFlow saving mark; a model states file, whose ``dp_world_size`` / ``mp_world_size``
    (read with ``mmap``: no tensor data is read) imply every rank file of :func:`_stock_expected`; each
    present and a readable zip. ``info``: ``global_step``, the world sizes, ``stock: True``. With
    ``rank``, only the files that rank reads are checked (world sizes then from that rank's files)."""
    if os.path.isfile(os.path.join(tag_dir, SAVING)):
        return None, f"a ds_chunkflow save of this tag did not finish ({SAVING} is there, {MANIFEST} is not)"
    names = set(os.listdir(tag_dir))
    states = sorted(n for n in names if _MODEL_STATES.match(n))
    if not states:
        return None, (f"no manifest ({MANIFEST}) and no DeepSpeed model states file "
                      "(mp_rank_XX_model_states.pt or zero_pp_rank_N_mp_rank_XX_model_states.pt)")
    info = {"global_step": None, "stock": True}
    if rank is None:
        reason = _check_file(tag_dir, {"path": states[0], "size": os.path.getsize(os.path.join(tag_dir, states[0])),
                                       "zip": True, "rank": 0})
        if reason:
            return None, reason
        try:
            meta = torch.load(os.path.join(tag_dir, states[0]), map_location="cpu", mmap=True, weights_only=False)
            dp, mp = int(meta["dp_world_size"]), int(meta["mp_world_size"])
            info.update(global_step=int(meta.get("global_steps", 0)), dp_world_size=dp, mp_world_size=mp)
        except Exception as e:  # noqa: BLE001 - any unreadable state is a reason, not a crash
            return None, f"unreadable DeepSpeed model states {states[0]}: {type(e).__name__}: {e}"
        expected = _stock_expected(names, dp, mp)
    else:
        expected = [(f, d) for f, d in _stock_expected(names, rank + 1, 1) if d in (rank, -1)]
    for path, d in expected:
        reason = _check_file(tag_dir, {"path": path, "size": None, "zip": True, "rank": d if d >= 0 else "any"})
        if reason:
            return None, f"{reason} (a DeepSpeed tag without manifest: every rank's files are expected)"
    info["files"] = [path for path, _ in expected]
    return info, None


def check_tag(load_dir, tag: str, rank: int | None = None, allow_stock: bool = False) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` if ``tag`` in ``load_dir`` is complete, else ``(None, reason)``.

    With ``rank``, only that rank's files are checked (the manifest must still be there). ``allow_stock``:
    a tag without manifest may be complete by DeepSpeed's standard (:func:`check_stock_tag`)."""
    tag_dir = os.path.join(os.fspath(load_dir), tag)
    if not os.path.isdir(tag_dir):
        return None, f"no directory {tag_dir}"
    manifest, reason = _read_manifest(tag_dir)
    if reason and allow_stock and not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        return check_stock_tag(tag_dir, rank)
    if reason:
        return None, reason
    for entry in manifest["files"]:
        if rank is not None and entry.get("rank") != rank:
            continue
        reason = _check_file(tag_dir, entry)
        if reason:
            return None, reason
    return manifest, None


def read_latest(load_dir) -> tuple[str | None, str | None]:
    """``(tag, None)`` from ``load_dir/latest``, or ``(None, why not)``."""
    path = os.path.join(os.fspath(load_dir), LATEST)
    if not os.path.isfile(path):
        return None, f"no `{LATEST}` file"
    try:
        with open(path) as f:
            tag = f.read().strip()
    except OSError as e:
        return None, f"unreadable `{LATEST}`: {e}"
    if not tag:
        return None, f"empty `{LATEST}` file"
    return tag, None


def _is_chunkflow_dir(load_dir: str) -> bool:
    """Some tag of ``load_dir`` was written (or begun) by ds_chunkflow: a manifest or a saving mark."""
    for name in os.listdir(load_dir):
        tag_dir = os.path.join(load_dir, name)
        if is_trash(name):
            continue
        if os.path.isfile(os.path.join(tag_dir, MANIFEST)) or os.path.isfile(os.path.join(tag_dir, SAVING)):
            return True
    return False


def find_complete_tag(load_dir) -> Resolved:
    """The tag to resume from in ``load_dir`` (single process, no collectives): ``latest`` if it is
    complete, else the newest complete tag by global step; ``Resolved(tag=None, ...)`` if none is.
    A directory without any ChunkFlow tag is judged by DeepSpeed's standard (:func:`check_stock_tag`)."""
    load_dir = os.fspath(load_dir)
    if not os.path.isdir(load_dir):
        return Resolved(None, found=f"directory {load_dir} does not exist")
    stock = not _is_chunkflow_dir(load_dir)
    skipped: list[str] = []
    latest, why = read_latest(load_dir)
    if latest is not None:
        manifest, reason = check_tag(load_dir, latest, allow_stock=stock)
        if manifest is not None:
            return Resolved(latest, manifest["global_step"], stock=stock)
        skipped.append(f"{latest} (named by `{LATEST}`): {reason}")
    candidates, others = [], []
    for name in sorted(os.listdir(load_dir)):
        if name == latest or is_trash(name) or not os.path.isdir(os.path.join(load_dir, name)):
            continue
        manifest, reason = check_tag(load_dir, name, allow_stock=stock)
        if manifest is not None:
            candidates.append((int(manifest["global_step"] or 0), name))
        elif looks_like_tag(load_dir, name):
            others.append(f"{name}: {reason}")
    if latest is None:
        skipped.insert(0, why)
    if not candidates:
        found = "; ".join(skipped + (others or ["no checkpoint tag directories"]))
        return Resolved(None, skipped=skipped + others, found=found)
    step, tag = max(candidates)
    # the newer incomplete tags are what was lost; older incomplete ones are only noise
    newer = [o for o in others if not _is_older(load_dir, o.split(":")[0], step)]
    return Resolved(tag, step, skipped + newer, stock=stock)


def looks_like_tag(load_dir, name: str) -> bool:
    """``load_dir/name`` belongs to a run's checkpoints: named ``global_step*``, or holding a ChunkFlow
    manifest / saving mark, or DeepSpeed state files (``*model_states.pt``, ``*optim_states.pt``)."""
    tag_dir = os.path.join(os.fspath(load_dir), name)
    if is_trash(name) or not os.path.isdir(tag_dir):
        return False
    if name.startswith("global_step"):
        return True
    try:
        return any(f in (MANIFEST, SAVING) or f.endswith(("model_states.pt", "optim_states.pt"))
                   for f in os.listdir(tag_dir))
    except OSError:
        return False


def checkpoint_entries(save_dir) -> list[str]:
    """What in ``save_dir`` belongs to a run's checkpoints: ``latest`` (if there), then the tag
    directories (:func:`looks_like_tag`), sorted; empty for a fresh or missing directory."""
    save_dir = os.fspath(save_dir)
    if not os.path.isdir(save_dir):
        return []
    found = [LATEST] if os.path.exists(os.path.join(save_dir, LATEST)) else []
    return found + sorted(name for name in os.listdir(save_dir) if looks_like_tag(save_dir, name))


def _is_older(load_dir: str, name: str, step: int) -> bool:
    digits = "".join(c for c in name if c.isdigit())
    return bool(digits) and name.startswith("global_step") and int(digits) < step


def describe_skips(load_dir, resolved: Resolved) -> str:
    return (f"ds_chunkflow: checkpoint in {os.fspath(load_dir)}: using tag {resolved.tag} (step {resolved.step}); "
            "skipped " + "; ".join(resolved.skipped))


def _broadcast(obj, device="cpu"):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device(device) if dist.get_backend() == "nccl" else None)
    return box[0]


def resolve_tag(load_dir, tag: str | None = None, device="cpu", warn: bool = True) -> Resolved:
    """The tag every rank loads (collective when distributed): an explicit ``tag`` must be complete;
    without one, :func:`find_complete_tag` on rank 0, broadcast. Raises :class:`CheckpointError`
    on every rank if there is nothing usable, or if any rank finds its own files of the tag damaged."""
    load_dir = os.fspath(load_dir)
    decided = None
    if _rank() == 0:
        if tag is not None:
            manifest, reason = check_tag(load_dir, str(tag), allow_stock=True)
            decided = (Resolved(str(tag), manifest["global_step"], stock=bool(manifest.get("stock")))
                       if manifest is not None else
                       f"checkpoint tag {tag} in {load_dir} is incomplete or damaged: {reason}")
        else:
            found = find_complete_tag(load_dir)
            decided = found if found.tag is not None else (
                f"no complete checkpoint in {load_dir}: {found.found}")
    decided = _broadcast(decided, device)
    if isinstance(decided, str):
        raise CheckpointError(decided)
    _, reason = check_tag(load_dir, decided.tag, rank=_rank(), allow_stock=decided.stock)  # own files (node-local)
    bad, = all_reduce([1.0 if reason else 0.0], "max", None, device)
    if reason:
        raise CheckpointError(f"checkpoint tag {decided.tag} in {load_dir}: rank {_rank()} finds {reason}")
    if bad > 0:
        raise CheckpointError(f"checkpoint tag {decided.tag} in {load_dir}: another rank found its files damaged")
    if warn and decided.skipped and _rank() == 0:
        warnings.warn(describe_skips(load_dir, decided), stacklevel=3)
    if warn and decided.stock and _rank() == 0:
        warnings.warn(f"ds_chunkflow: checkpoint tag {decided.tag} in {load_dir} has no ChunkFlow manifest "
                      f"({MANIFEST}): loading it as a plain DeepSpeed checkpoint, complete by DeepSpeed's standard "
                      "(every rank's files present)", stacklevel=3)
    return decided


def restore_sampler(sampler, client_state: dict | None, key: str, path, resolved: Resolved) -> None:
    """Puts the data sampler where the checkpoint left it (``client_state[key]``, popped). A plain
    DeepSpeed tag has no such position: the sampler stays at its start, with a warning saying so; a
    ChunkFlow tag without it is an error (written by an engine without training data)."""
    if key in (client_state or {}):
        sampler.load_state_dict(client_state.pop(key))
        return
    if resolved.stock:
        warnings.warn(f"ds_chunkflow: checkpoint {path} (plain DeepSpeed) has no data-sampler position ({key}): "
                      "weights and optimizer state are loaded, the training data starts again from its first "
                      "global batch", stacklevel=3)
        return
    raise ValueError(f"checkpoint {path} has no data-sampler position ({key}); "
                     "it was not written by a ChunkFlow engine with training data")


# ----------------------------------------------------------------------------- resuming (examples)
def resume_decision(load_dir, mode: str | None) -> Resolved | None:
    """What ``--resume`` means for ``load_dir`` (collective when distributed: rank 0 looks, all agree).

    ``mode`` None: do not resume (None). ``"auto"``: the complete checkpoint if there is one, else
    None (start fresh). ``"required"``: the complete checkpoint, else :class:`CheckpointError` naming
    the directory and what it held."""
    if mode is None:
        return None
    if mode not in ("auto", "required"):
        raise ValueError(f"resume mode must be 'auto' or 'required', not {mode!r}")
    found = _broadcast(find_complete_tag(load_dir) if _rank() == 0 else None)
    if found.tag is None:
        if mode == "required":
            raise CheckpointError(f"--resume: no complete checkpoint to resume from in {os.fspath(load_dir)} "
                                  f"({found.found}); use --resume auto to start fresh when there is none")
        return None
    return found
