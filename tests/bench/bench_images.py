"""Benchmark: image import, content write and snapshot cycles, ours beside real containerd's.

Runs the same inputs and clients against a pycontainerd daemon and Debian's containerd 1.6
(CRI off, private paths; "not installed" when the binary is missing), one fresh pair of
daemons per measurement, and prints one table: our median, theirs, ours/theirs, which
direction is better, and the spread (min..max) of each side's runs.

- import: ``ctr images import`` of a ~200 MB three-layer image of random data with gzip
  layers, built once into /tmp. MB/s = archive size / wall time (and uncompressed size /
  wall time). The machine floor in the same run is GNU ``tar -xzf`` of the three layer
  blobs, one after the other, into a fresh directory on the daemons' filesystem. The image
  is removed with ``images rm --sync`` after each run (and the stores are checked empty),
  so each import writes and unpacks everything again. Every timed run starts after
  ``sync`` (dirty pages of the previous run would otherwise be flushed on its time); the
  archive and blobs stay in the page cache for everyone; the order of the three
  contenders rotates between runs. Each run also records the daemon's and ctr's CPU
  time, and imports a second time in two timed phases, ``import --no-unpack`` (content
  ingest) and ``ctr snapshots unpack`` of the manifest (Diff.Apply), to show where the
  wall time goes.
- content write: 100 MB through ``ctr content ingest`` (Go client, 1 MiB messages) and
  through the Python gRPC client of ``bench_content_write`` (same exchange).
- snapshots: Prepare(parent) + Commit + Remove cycle latency through the Snapshots gRPC
  API with the Python client of ``bench_snapshots`` (median, p90), and the same cycle as
  three ``ctr snapshots`` commands.

    .venv/bin/python -m tests.bench.bench_images [--quick] [--no-containerd]
        [--profile-import OUT]   # also py-spy one extra import of ours (needs py-spy)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import grpc.aio

from pycontainerd.api.services.content.v1 import content_pb2_grpc
from tests.bench.bench_content_write import OPTIONS, write_once
from tests.bench.bench_core import QuietDaemon
from tests.bench.bench_snapshots import Target
from tests.bench.common import CONFIG, cpu_seconds, percentile
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import CTR, Daemon
from tests.support.images import Image, Layer, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

OURS, THEIRS, FLOOR = "pycontainerd", "containerd", "tar -xzf"
MB = 1_000_000
MiB = 1 << 20
REF = "bench.local/pcd/random:3x67m"
SNAPSHOTTER = "overlayfs"
CACHE = Path("/tmp/pcd-bench-images")
PY_SPY = Path("/tmp/spyvenv/bin/py-spy")


@dataclass(frozen=True)
class Plan:
    import_runs: int = 5
    ingest_runs: int = 5
    ingest_mb: int = 100
    snap_cycles: int = 300
    snap_batch: int = 25
    ctr_snap_cycles: int = 20


QUICK = Plan(import_runs=3, ingest_runs=3, snap_cycles=200, snap_batch=50, ctr_snap_cycles=8)


@contextlib.contextmanager
def daemons(kinds: list[str]) -> Iterator[dict[str, Daemon]]:
    """A fresh daemon of each kind, stopped and removed afterwards."""
    out: dict[str, Daemon] = {}
    try:
        for kind in kinds:
            out[kind] = QuietDaemon(config=CONFIG) if kind == OURS else Containerd()
            out[kind].start()
        yield out
    finally:
        for d in out.values():
            d.cleanup()


def rotations(items: list[str], runs: int) -> Iterator[list[str]]:
    """``items`` in a rotated order per run, so no contender always goes first."""
    for i in range(runs):
        k = i % len(items)
        yield items[k:] + items[:k]


# --- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    archive: Path
    layers: list[Path]  # the gzip layer blobs, bottom first
    compressed: int  # archive bytes
    uncompressed: int  # sum of the layer tars
    chain_id: str

    @cached_property
    def manifest(self) -> str:
        """The image manifest's digest, from the archive's index.json."""
        with tarfile.open(self.archive) as tf:
            f = tf.extractfile("index.json")
            assert f is not None
            return str(json.load(f)["manifests"][0]["digest"])


def build_inputs(layer_mb: int = 67) -> Inputs:
    """Build (or reuse from /tmp) the image archive and its layer blobs."""
    CACHE.mkdir(exist_ok=True)
    meta = CACHE / f"inputs-{layer_mb}.json"
    if meta.exists():
        d = json.loads(meta.read_text())
        inputs = Inputs(
            **{
                **d,
                "archive": Path(d["archive"]),
                "layers": [Path(p) for p in d["layers"]],
            }
        )
        if all(p.exists() for p in (inputs.archive, *inputs.layers)):
            return inputs
    print(f"building a 3 x {layer_mb} MB random image in {CACHE} (once) ...", flush=True)
    # Seeded random bytes: incompressible, and the same image on every build.
    rng = random.Random(20240601)
    layers = [
        Layer().dirs("data").file(f"data/layer{i}.bin", rng.randbytes(layer_mb * MB))
        for i in range(3)
    ]
    image = Image(tuple(layers), compression="gzip")
    archive = CACHE / f"image-{layer_mb}.tar"
    write_oci_archive(archive, {REF: image})
    paths = []
    for i, blob in enumerate(image.layer_blobs):
        p = CACHE / f"layer{i}-{layer_mb}.tar.gz"
        p.write_bytes(blob.data)
        paths.append(p)
    inputs = Inputs(
        archive=archive,
        layers=paths,
        compressed=archive.stat().st_size,
        uncompressed=sum(len(ly.tar_bytes()) for ly in layers),
        chain_id=image.chain_id,
    )
    fields = {f: getattr(inputs, f) for f in Inputs.__dataclass_fields__}
    meta.write_text(json.dumps(fields, default=str))
    return inputs


# --- import ------------------------------------------------------------------------------


def ctr(d: Daemon, *args: str, namespace: str = "default", timeout: float = 300.0) -> str:
    return d.ctr(*args, namespace=namespace, timeout=timeout).stdout


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed_ctr(d: Daemon, *args: str) -> tuple[float, float, float]:
    """(wall s, daemon CPU s, ctr CPU s) of one ctr command, after a ``sync``."""
    assert d.proc is not None
    os.sync()
    c0, k0, t0 = cpu_seconds(d.proc.pid), _children_cpu(), time.perf_counter()
    ctr(d, *args)
    t1 = time.perf_counter()
    return t1 - t0, cpu_seconds(d.proc.pid) - c0, _children_cpu() - k0


def _remove_image(d: Daemon, inputs: Inputs) -> None:
    """``images rm --sync``, then check that nothing is left for the next import to reuse."""
    ctr(d, "images", "rm", "--sync", REF)
    left = ctr(d, "content", "ls", "-q").split() + [
        line.split()[0]
        for line in ctr(d, "snapshots", "--snapshotter", SNAPSHOTTER, "ls").splitlines()[1:]
    ]
    if left:
        raise RuntimeError(f"{d.address}: images rm --sync left {left[:4]}...")


def import_once(d: Daemon, inputs: Inputs, samples: dict[str, list[float]]) -> None:
    """One ``ctr images import`` (unpacking), then the same as its two phases.

    Appends to ``samples``: "wall", "cpu" (daemon), "ctr_cpu", "ingest" (import
    --no-unpack) and "unpack" (``ctr snapshots unpack`` of the manifest).
    """
    wall, cpu, ctr_cpu = _timed_ctr(
        d, "images", "import", "--snapshotter", SNAPSHOTTER, str(inputs.archive)
    )
    # Check that the import unpacked.
    ctr(d, "snapshots", "--snapshotter", SNAPSHOTTER, "info", inputs.chain_id)
    _remove_image(d, inputs)
    ingest = _timed_ctr(d, "images", "import", "--no-unpack", str(inputs.archive))[0]
    unpack = _timed_ctr(d, "snapshots", "--snapshotter", SNAPSHOTTER, "unpack", inputs.manifest)
    _remove_image(d, inputs)
    for key, v in (
        ("wall", wall),
        ("cpu", cpu),
        ("ctr_cpu", ctr_cpu),
        ("ingest", ingest),
        ("unpack", unpack[0]),
    ):
        samples.setdefault(key, []).append(v)


def tar_once(inputs: Inputs) -> float:
    """Seconds for GNU tar to decompress and extract the three layers into a fresh dir."""
    # /tmp: the daemons' roots live there too (tests.support.daemon).
    dest = Path(tempfile.mkdtemp(prefix="pcd-floor-", dir="/tmp"))
    try:
        os.sync()
        t0 = time.perf_counter()
        for layer in inputs.layers:
            subprocess.run(["tar", "-xzf", str(layer), "-C", str(dest)], check=True)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def measure_import(
    kinds: list[str], inputs: Inputs, runs: int, profile: Path | None
) -> dict[str, dict[str, list[float]]]:
    """Per contender, lists of samples by key (see ``import_once``; the floor has "wall")."""
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in [*kinds, FLOOR]}
    with daemons(kinds) as ds:
        # Warm-up: page cache for the archive and blobs, code paths, ctr's binary.
        for d in ds.values():
            import_once(d, inputs, {})
        tar_once(inputs)
        for order in rotations([*kinds, FLOOR], runs):
            for kind in order:
                if kind == FLOOR:
                    samples[FLOOR].setdefault("wall", []).append(tar_once(inputs))
                else:
                    import_once(ds[kind], inputs, samples[kind])
        if profile is not None and OURS in ds:
            profile_import(ds[OURS], inputs, profile)
    return samples


def profile_import(d: Daemon, inputs: Inputs, out: Path) -> None:
    """One more import of ours under py-spy; writes ``out`` (svg) and ``out``.txt (raw)."""
    if not PY_SPY.exists():
        print(f"no py-spy at {PY_SPY}: not profiling", file=sys.stderr)
        return
    assert d.proc is not None
    raw = out.with_suffix(".txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            [
                str(PY_SPY),
                "record",
                "--pid",
                str(d.proc.pid),
                "--rate",
                "200",
                "--threads",
                "--format",
                fmt,
                "-o",
                str(path),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(path.with_suffix(".log"), "wb"),  # noqa: SIM115 - the child's
        )
        for fmt, path in (("flamegraph", out), ("raw", raw))
    ]
    time.sleep(1.0)  # let py-spy attach
    try:
        import_once(d, inputs, {})
    finally:
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
    print(f"py-spy profile of one import of ours: {out} and {raw}", file=sys.stderr)


# --- content write -----------------------------------------------------------------------


def ingest_once(d: Daemon, blob: Path, digest: str, n: int) -> tuple[float, float]:
    """(wall s, daemon CPU s) of ``ctr content ingest`` of ``blob``; deletes it afterwards."""
    assert CTR is not None and d.proc is not None
    size = str(blob.stat().st_size)
    cmd = [CTR, "-a", d.address, "-n", "bench", "content", "ingest"]
    cmd += ["--expected-size", size, "--expected-digest", digest, f"bench-ingest-{n}"]
    os.sync()
    with blob.open("rb") as stdin:
        c0, t0 = cpu_seconds(d.proc.pid), time.perf_counter()
        subprocess.run(cmd, stdin=stdin, check=True, capture_output=True, timeout=300)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(d.proc.pid) - c0
    ctr(d, "content", "rm", digest, namespace="bench")
    return elapsed, cpu


async def py_write_once(d: Daemon, data: bytes, n: int) -> tuple[float, float]:
    """(wall s, daemon CPU s) of one Write through the Python client."""
    assert d.proc is not None
    os.sync()
    async with grpc.aio.insecure_channel(f"unix://{d.address}", options=OPTIONS) as ch:
        c0 = cpu_seconds(d.proc.pid)
        t = await write_once(content_pb2_grpc.ContentStub(ch), data, f"bench-py-{n}")
        return t, cpu_seconds(d.proc.pid) - c0


def measure_content(kinds: list[str], size: int, runs: int) -> dict[str, dict[str, list[float]]]:
    """ctr ingest and Python Write MB/s samples, on fresh random bytes for every run.

    Fresh bytes because a deleted blob stays on containerd's disk until its GC runs, and a
    write of the same digest would then skip the copy.
    """
    out: dict[str, dict[str, list[float]]] = {m: {} for m in ("ingest", "py", "ingest_cpu")}
    blob = CACHE / "ingest.bin"
    try:
        with daemons(kinds) as ds:
            for i, order in enumerate(rotations(kinds, runs + 1)):
                data = random.randbytes(size)
                blob.write_bytes(data)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                py_data = random.randbytes(size)
                for kind in order:
                    t, cpu = ingest_once(ds[kind], blob, digest, i)
                    if i:  # run 0 is the warm-up
                        out["ingest"].setdefault(kind, []).append(t)
                        out["ingest_cpu"].setdefault(kind, []).append(cpu)
                for kind in order:
                    t, cpu = asyncio.run(py_write_once(ds[kind], py_data, i))
                    if i:
                        out["py"].setdefault(kind, []).append(t)
    finally:
        blob.unlink(missing_ok=True)
    return out


# --- snapshots ---------------------------------------------------------------------------


async def grpc_cycles(
    ds: dict[str, Daemon], plan: Plan, cpu: dict[str, list[float]]
) -> dict[str, Target]:
    """Run the gRPC cycles; appends each daemon's CPU ms per cycle, per batch, to ``cpu``."""
    targets = {k: Target(d.address, SNAPSHOTTER) for k, d in ds.items()}
    for t in targets.values():
        await t.open()
        await t.run(20, record=False)
    # Alternating batches so both see the same (possibly noisy) machine.
    batches = -(-plan.snap_cycles // plan.snap_batch)
    for i, order in enumerate(rotations(list(targets), batches)):
        n = min(plan.snap_batch, plan.snap_cycles - i * plan.snap_batch)
        for k in order:
            proc = ds[k].proc
            assert proc is not None
            c0 = cpu_seconds(proc.pid)
            await targets[k].run(n)
            cpu.setdefault(k, []).append((cpu_seconds(proc.pid) - c0) / n)
    return targets


def ctr_cycle(d: Daemon, base: str, n: int) -> float:
    """One prepare/commit/rm through three ctr processes; seconds."""
    sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
    key = f"bench-ctr-{n}"
    t0 = time.perf_counter()
    ctr(d, *sn, "prepare", key, base, namespace="bench")
    ctr(d, *sn, "commit", key + "-c", key, namespace="bench")
    ctr(d, *sn, "rm", key + "-c", namespace="bench")
    return time.perf_counter() - t0


def measure_snapshots(kinds: list[str], plan: Plan) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {"grpc": {}, "ctr": {}, "cpu": {}}

    async def run(ds: dict[str, Daemon]) -> None:
        targets = await grpc_cycles(ds, plan, out["cpu"])
        try:
            for k, t in targets.items():
                out["grpc"][k] = t.samples
            for k in kinds:
                ctr_cycle(ds[k], targets[k].base, -1)
            for i, order in enumerate(rotations(kinds, plan.ctr_snap_cycles)):
                for k in order:
                    out["ctr"].setdefault(k, []).append(ctr_cycle(ds[k], targets[k].base, i))
        finally:
            for t in targets.values():
                await t.close()

    with daemons(kinds) as ds:
        asyncio.run(run(ds))
    return out


# --- report ------------------------------------------------------------------------------


Row = tuple[str, str, str, str, str, str]


def row(
    metric: str,
    values: dict[str, list[float]],
    fmt: Callable[[list[float]], float],
    unit: str,
    higher_better: bool,
    digits: int = 1,
) -> Row:
    def cell(kind: str) -> tuple[str, float | None]:
        if kind not in values:
            return "n/a", None
        v = fmt(values[kind])
        return f"{v:.{digits}f}", v

    ours, o = cell(OURS)
    theirs, t = cell(THEIRS)
    ratio = f"{o / t:.2f}" if o is not None and t else "-"
    better = f"higher ({unit})" if higher_better else f"lower ({unit})"
    spread = "  ".join(
        "{:.{d}f}..{:.{d}f}".format(*sorted((fmt([min(v)]), fmt([max(v)]))), d=digits)
        for v in (values.get(OURS), values.get(THEIRS))
        if v
    )
    return metric, ours, theirs, ratio, better, spread


def rate(size: int) -> Callable[[list[float]], float]:
    return lambda ts: size / MB / statistics.median(ts)


def ms_median(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def ms_p90(ts: list[float]) -> float:
    return percentile(ts, 90) * 1e3


def print_table(rows: list[Row]) -> None:
    head: Row = ("metric", OURS, THEIRS, "ratio", "better", "runs min..max (ours  theirs)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print(
            " | ".join(
                c.ljust(w) if i in (0, 4, 5) else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def import_rows(
    samples: dict[str, dict[str, list[float]]], inputs: Inputs, notes: list[str]
) -> list[Row]:
    def by(key: str) -> dict[str, list[float]]:
        return {k: v[key] for k, v in samples.items() if key in v and k != FLOOR}

    mbps = rate(inputs.compressed)
    rows = [
        row("import MB/s (archive size)", by("wall"), mbps, "MB/s", True),
        row("import MB/s (uncompressed)", by("wall"), rate(inputs.uncompressed), "MB/s", True),
    ]
    floor, ours = mbps(samples[FLOOR]["wall"]), mbps(samples[OURS]["wall"])
    lo, hi = sorted(mbps([t]) for t in (min(samples[FLOOR]["wall"]), max(samples[FLOOR]["wall"])))
    rows.append(
        (
            "  floor: tar -xzf of the 3 layers, MB/s",
            f"{floor:.1f}",
            "",
            "",
            "higher (MB/s)",
            f"{lo:.1f}..{hi:.1f}",
        )
    )
    pct = 100 * ours / floor
    rows.append(("  ours as % of the floor", f"{pct:.0f}%", "", "", "higher (need >= 60%)", ""))
    notes.append(f"import vs tar floor: {pct:.0f}% (need >= 60%): {'OK' if pct >= 60 else 'SHORT'}")
    if THEIRS in samples:
        r = ours / mbps(samples[THEIRS]["wall"])
        notes.append(f"import vs containerd: {r:.2f} (need >= 1.0): {'OK' if r >= 1 else 'SHORT'}")
    rows += [
        row("import: daemon CPU s", by("cpu"), statistics.median, "s", False, 2),
        row("import: ctr CPU s (client)", by("ctr_cpu"), statistics.median, "s", False, 2),
        row("phase: import --no-unpack s", by("ingest"), statistics.median, "s", False, 2),
        row("phase: snapshots unpack s", by("unpack"), statistics.median, "s", False, 2),
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (about 90 s)")
    ap.add_argument("--no-containerd", action="store_true")
    ap.add_argument("--only", choices=["import", "content", "snapshots"], action="append")
    ap.add_argument("--profile-import", type=Path, metavar="OUT.svg")
    args = ap.parse_args()
    if CTR is None:
        raise SystemExit("ctr is not installed")
    plan = QUICK if args.quick else Plan()
    kinds = [OURS] if args.no_containerd or CONTAINERD is None else [OURS, THEIRS]
    only = set(args.only or ["import", "content", "snapshots"])
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    inputs = build_inputs()
    rows: list[Row] = []
    notes: list[str] = []
    if "import" in only:
        rows += import_rows(
            measure_import(kinds, inputs, plan.import_runs, args.profile_import), inputs, notes
        )
    if "content" in only:
        size = plan.ingest_mb * MB
        cw = measure_content(kinds, size, plan.ingest_runs)
        mb = plan.ingest_mb
        rows.append(
            row(f"content write {mb} MB, ctr ingest", cw["ingest"], rate(size), "MB/s", True)
        )
        rows.append(row(f"content write {mb} MB, Python gRPC", cw["py"], rate(size), "MB/s", True))
        rows.append(
            row("  daemon CPU s per ctr ingest", cw["ingest_cpu"], statistics.median, "s", False, 2)
        )
    if "snapshots" in only:
        sn = measure_snapshots(kinds, plan)
        n = plan.snap_cycles
        rows.append(row(f"snapshot cycle gRPC p50 (n={n})", sn["grpc"], ms_median, "ms", False, 2))
        rows.append(row(f"snapshot cycle gRPC p90 (n={n})", sn["grpc"], ms_p90, "ms", False, 2))
        rows.append(row("  daemon CPU ms per gRPC cycle", sn["cpu"], ms_median, "ms", False, 2))
        m = plan.ctr_snap_cycles
        rows.append(row(f"snapshot cycle 3x ctr p50 (n={m})", sn["ctr"], ms_median, "ms", False))
    print()
    print_table(rows)
    if THEIRS not in kinds:
        print("containerd: not compared (not installed or --no-containerd)")
    for note in notes:
        print(note)
    print(
        f"archive {inputs.compressed / MB:.1f} MB, layers uncompressed "
        f"{inputs.uncompressed / MB:.1f} MB; total {time.perf_counter() - start:.0f} s; "
        f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end "
        f"({os.cpu_count()} CPUs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
