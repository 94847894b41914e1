"""Crash-safe checkpoints on DeepSpeed's layout: a manifest marks a tag complete, ``latest`` moves last.

Save (:func:`save_checkpoint`, used by both ChunkFlow engines through ``ChunkFlowMixin``):

1. rank 0 removes the tag's old manifest (a tag being rewritten is incomplete until it is done);
2. DeepSpeed's own ``save_checkpoint(..., save_latest=False)`` writes its usual files, while every
   ``checkpoint_engine.save`` call is recorded, so each rank knows the files it wrote;
3. every rank fsyncs its files and the directories they are in; the lists (path, size, rank) are
   gathered on rank 0 (a collective, hence also a barrier over all ranks);
4. rank 0 writes ``<tag>/ds_chunkflow_complete.json`` (files, sizes, world size, global step) and then
   ``latest``, each atomically (temporary file in the same directory, fsync, ``os.replace``, fsync
   of the directory); a final barrier.

So a kill at any moment leaves ``latest`` either at the previous tag or at a complete new one, and a
tag without a manifest is known to be incomplete. The layout is DeepSpeed's: stock tools
(``zero_to_fp32.py``, ``load_checkpoint(tag=...)``) read it as before; the manifest is one more file.

Load (:func:`resolve_tag`): ``latest`` is used if the tag it names is complete (manifest present,
every listed file present with its listed size, ``.pt`` zip archives with an intact central
directory). Otherwise the newest complete tag by the manifest's global step is used, with a warning
naming each tag skipped and why. A damaged tag is never used; no complete tag at all is an error
naming the directory and what was found. Rank 0 decides and broadcasts; every rank then checks its
own files of the chosen tag, and any failure is raised on all ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .distributed import all_reduce

MANIFEST = "ds_chunkflow_complete.json"
LATEST = "latest"
FORMAT = 1


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for (missing, incomplete or damaged)."""


@dataclass
class Resolved:
    """The tag chosen by :func:`find_complete_tag` and what was skipped on the way."""

    tag: str | None
    step: int | None = None
    skipped: list[str] = field(default_factory=list)  # one line per tag not used: "tag: reason"
    found: str = ""  # what the directory held, for error messages


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


@contextlib.contextmanager
def _recording_saves(checkpoint_engine):
    """Records the path of every ``checkpoint_engine.save`` made inside the block (this rank's files)."""
    paths: list[str] = []
    original = checkpoint_engine.save
    own = "save" in vars(checkpoint_engine)  # an instance attribute to put back, or the class's method

    def save(state_dict, path, *args, **kwargs):
        result = original(state_dict, path, *args, **kwargs)
        paths.append(os.fspath(path))
        return result

    checkpoint_engine.save = save
    try:
        yield paths
    finally:
        if own:
            checkpoint_engine.save = original
        else:
            del checkpoint_engine.save


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
    if engine.checkpoint_engine.is_decoupled():  # asynchronous writers: files are not done when save returns
        warnings.warn("ds_chunkflow: a decoupled checkpoint engine is not made crash-safe; saving as DeepSpeed does")
        return ds_save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)
    rank, world = _rank(), _world()
    tag_dir = os.path.join(save_dir, tag)
    if rank == 0:  # rewriting a tag: incomplete until its new manifest is written (DeepSpeed barriers first)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(tag_dir, MANIFEST))
            _fsync_path(tag_dir)
    with _recording_saves(engine.checkpoint_engine) as written:
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
    if size != entry["size"]:
        return f"truncated file {entry['path']} {who}: {size} bytes, the manifest says {entry['size']}"
    if entry.get("zip") and not zipfile.is_zipfile(path):
        return f"damaged file {entry['path']} {who}: not a readable zip archive"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"unreadable file {entry['path']} {who}: {e}"
    return None


def check_tag(load_dir, tag: str, rank: int | None = None) -> tuple[dict | None, str | None]:
    """``(manifest, None)`` if ``tag`` in ``load_dir`` is complete, else ``(None, reason)``.

    With ``rank``, only that rank's files are checked (the manifest must still be there)."""
    tag_dir = os.path.join(os.fspath(load_dir), tag)
    if not os.path.isdir(tag_dir):
        return None, f"no directory {tag_dir}"
    manifest, reason = _read_manifest(tag_dir)
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


def find_complete_tag(load_dir) -> Resolved:
    """The tag to resume from in ``load_dir`` (single process, no collectives): ``latest`` if it is
    complete, else the newest complete tag by global step; ``Resolved(tag=None, ...)`` if none is."""
    load_dir = os.fspath(load_dir)
    if not os.path.isdir(load_dir):
        return Resolved(None, found=f"directory {load_dir} does not exist")
    skipped: list[str] = []
    latest, why = read_latest(load_dir)
    if latest is not None:
        manifest, reason = check_tag(load_dir, latest)
        if manifest is not None:
            return Resolved(latest, int(manifest["global_step"]))
        skipped.append(f"{latest} (named by `{LATEST}`): {reason}")
    candidates, others = [], []
    for name in sorted(os.listdir(load_dir)):
        if name == latest or not os.path.isdir(os.path.join(load_dir, name)):
            continue
        manifest, reason = check_tag(load_dir, name)
        if manifest is not None:
            candidates.append((int(manifest["global_step"]), name))
        elif os.path.isfile(os.path.join(load_dir, name, MANIFEST)) or _looks_like_tag(load_dir, name):
            others.append(f"{name}: {reason}")
    if latest is None:
        skipped.insert(0, why)
    if not candidates:
        found = "; ".join(skipped + (others or ["no checkpoint tag directories"]))
        return Resolved(None, skipped=skipped + others, found=found)
    step, tag = max(candidates)
    # the newer incomplete tags are what was lost; older incomplete ones are only noise
    newer = [o for o in others if not _is_older(load_dir, o.split(":")[0], step)]
    return Resolved(tag, step, skipped + newer)


def _looks_like_tag(load_dir: str, name: str) -> bool:
    try:
        return any(f.endswith(".pt") for f in os.listdir(os.path.join(load_dir, name)))
    except OSError:
        return False


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
            manifest, reason = check_tag(load_dir, str(tag))
            decided = (Resolved(str(tag), int(manifest["global_step"])) if manifest is not None else
                       f"checkpoint tag {tag} in {load_dir} is incomplete or damaged: {reason}")
        else:
            found = find_complete_tag(load_dir)
            decided = found if found.tag is not None else (
                f"no complete checkpoint in {load_dir}: {found.found}")
    decided = _broadcast(decided, device)
    if isinstance(decided, str):
        raise CheckpointError(decided)
    _, reason = check_tag(load_dir, decided.tag, rank=_rank())  # this rank's own files (node-local disks too)
    bad, = all_reduce([1.0 if reason else 0.0], "max", None, device)
    if reason:
        raise CheckpointError(f"checkpoint tag {decided.tag} in {load_dir}: rank {_rank()} finds {reason}")
    if bad > 0:
        raise CheckpointError(f"checkpoint tag {decided.tag} in {load_dir}: another rank found its files damaged")
    if warn and decided.skipped and _rank() == 0:
        warnings.warn(describe_skips(load_dir, decided), stacklevel=3)
    return decided


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
