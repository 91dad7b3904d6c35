"""A capture SIGKILLed at random points still loads, validates, and holds every shard it reported."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from hopfield_aa.traces import TraceSet

# The capture loop run in a subprocess: the tiny UNet, all layers, forever. One record per shard, so that
# most of the loop's time is spent writing shards and manifests, where a kill does the most harm.
WORKER = """
import sys, torch
torch.set_num_threads(1)
from hopfield_aa.traces import capture
from hopfield_aa.traces.testing import tiny_unet, unet_inputs
model = tiny_unet()
inputs = unet_inputs(model)
report = lambda n, name: print("SHARD", n, name, flush=True)
with capture(model, sys.argv[1], shard_bytes=1, on_shard=report) as cap:
    cap.begin_run(prompt_id=0, seed=0)
    print("READY", flush=True)
    with torch.no_grad():
        while True:
            model(**inputs)
"""

RECORDS_PER_STEP = 16  # 8 attention layers x 2 batch rows


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkilled_capture_keeps_every_reported_shard(tmp_path):
    rng = random.Random(20240611)
    plans = [(rng.randint(0, 24), rng.uniform(0.0, 0.03)) for _ in range(4)]
    workers = []
    for i in range(len(plans)):
        out = tmp_path / f"capture{i}"
        errors = open(tmp_path / f"stderr{i}.txt", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(out)], stdout=subprocess.PIPE, stderr=errors, text=True
        )
        workers.append((proc, out, errors))
    for (proc, out, errors), (wait_shards, delay) in zip(workers, plans, strict=True):
        lines = []
        assert proc.stdout is not None
        while True:  # wait for READY and then `wait_shards` shard reports
            line = proc.stdout.readline()
            if not line:
                errors.seek(0)
                pytest.fail(f"worker exited early: {errors.read()}")
            lines.append(line)
            if line.startswith("READY") and wait_shards == 0:
                break
            if line.startswith("SHARD") and int(line.split()[1]) >= wait_shards:
                break
        time.sleep(delay)  # a random point: often inside a shard or manifest write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        errors.close()
        rest = proc.stdout.read()  # what the worker printed before it died (buffered lines included)
        assert proc.returncode == -signal.SIGKILL
        reported = [
            line.split()[2] for line in lines + rest.splitlines(keepends=True) if line.startswith("SHARD")
        ]

        traces = TraceSet(out)
        summary = traces.validate()
        assert not traces.complete
        # every shard reported before the kill is listed; at most one more was committed but not reported
        assert traces.shards[: len(reported)] == reported
        assert len(reported) <= len(traces.shards) <= len(reported) + 1
        assert summary["records"] == len(traces.shards) == len(traces)
        assert [r["step"] for r in traces.entries] == [i // RECORDS_PER_STEP for i in range(len(traces))]
        assert all(name.startswith("shard-") for name in traces.unlisted_files)
        assert len(traces.unlisted_files) <= 1
