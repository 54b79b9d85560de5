"""`gs://` workdirs against a Cloud Storage emulator (tests/gcs_emulator.py): every layer that writes one talks to
it, tensorstore (orbax's arrays), TensorFlow's file system (etils.epath, orbax's directories, TensorBoard) and
google-cloud-storage (orbax's listing of steps)."""

import csv
import io
import json
import signal

import gcs_emulator
import numpy as np
import pytest
from conftest import REPO, require
from export_helpers import jax_logits, random_inputs
from test_reliability import _run_until_killed, crash_run_args
from train_helpers import assert_bitwise_equal, saved_state

BUCKET = "mnv2-test"
ROOT = f"gs://{BUCKET}/sweeps"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator with bucket BUCKET, and its environment in this process (the `mnv2` subprocesses inherit it)."""
    require("gcs_emulator")
    emulator = gcs_emulator.start(BUCKET, tmp_path_factory.mktemp("gcs") / "ca.pem")
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in emulator.environment.items():
                patch.setenv(name, value)
            yield emulator
    finally:
        emulator.stop()


def _csv_rows(path: str) -> dict[str, dict[str, str]]:
    from etils import epath

    return {row["run"]: row for row in csv.DictReader(io.StringIO(epath.Path(path).read_text()))}


@pytest.mark.slow
@pytest.mark.xdist_group("small_run")  # the compiled train step of test_train's `trained`
def test_a_gs_workdir_resumes_after_sigkill_bitwise_and_reports_and_exports(gcs, folder, mnv2, tmp_path):
    """A sweep run's `mnv2 train` in a gs:// workdir, SIGKILLed inside checkpoint 4's write, then the same command
    again: it removes the uncommitted step, resumes from step 3 and ends bitwise equal to the run in a local workdir;
    `mnv2 sweep --report` over the gs:// runs and `mnv2 export` from the gs:// workdir work too."""
    import onnxruntime

    from mnv2_jax import inference
    from mnv2_jax.sweeps import spec
    from mnv2_jax.training import checkpoint, run_files

    args = crash_run_args(folder)  # --config configs/quickstart.py --config.FIELD=VALUE ...
    overrides = dict(arg.removeprefix("--config.").split("=", 1) for arg in args[2:])
    sweep_file = tmp_path / "gcs.py"
    definition = {"config": args[1], "overrides": overrides, "variants": [{"name": "resumed"}, {"name": "new"}]}
    sweep_file.write_text(f"def get_sweep():\n    return {definition!r}\n")
    sweep = spec.load(str(sweep_file), ROOT)
    workdir = sweep.runs[0].workdir
    command = spec.train_command(sweep, sweep.runs[0])[1:]  # train --config ... --workdir gs://... --config...
    prefix = workdir.removeprefix(f"gs://{BUCKET}/")

    local = str(tmp_path / "local")
    status, _, err = mnv2(*[local if arg == workdir else arg for arg in command])
    assert status == 0, err[-3000:]

    status, err = _run_until_killed(command, "checkpoint:4", tmp_path / "killed.log")
    assert status == -signal.SIGKILL, err[-3000:]
    stored = gcs.objects(prefix)
    assert f"{prefix}/checkpoints/3/commit_success.txt" in stored
    assert any(name.startswith(f"{prefix}/checkpoints/4/") for name in stored)  # written, not committed
    assert f"{prefix}/checkpoints/4/commit_success.txt" not in stored
    assert checkpoint.latest_step(workdir) == 3

    status, _, err = mnv2(*command)  # the same command again
    assert status == 0, err[-3000:]
    assert f"removing incomplete checkpoint {workdir}/checkpoints/4" in err
    assert f"resumed from {workdir}/checkpoints at step 3" in err
    (step, resumed), (_, expected) = saved_state(workdir), saved_state(local)
    assert step == 6
    assert_bitwise_equal(resumed, expected)

    # Each layer wrote its own objects to the emulator, and nothing landed in a local folder `gs:/...`.
    stored = gcs.objects(prefix)
    assert f"{prefix}/checkpoints/6/params/ocdbt.process_0/manifest.ocdbt" in stored  # tensorstore
    assert f"{prefix}/checkpoints/6/commit_success.txt" in stored  # orbax through TF's file system
    assert {f"{prefix}/{name}" for name in ("config.json", "metrics.jsonl", "finished.json")} <= set(stored)  # epath
    assert any(name.startswith(f"{prefix}/tensorboard/events.out.tfevents.") for name in stored)  # TF's summaries
    assert not (REPO / "gs:").exists() and not (tmp_path / "gs:").exists()
    local_metrics, gcs_metrics = run_files.read_metrics(local), run_files.read_metrics(workdir)
    assert run_files.last_eval_metrics(gcs_metrics) == run_files.last_eval_metrics(local_metrics)

    status, out, err = mnv2("sweep", sweep_file, "--root", ROOT, "--report")
    assert status == 0, err[-3000:]
    report = f"{ROOT}/gcs/report"
    assert f"{report}/report.csv" in out.splitlines()
    assert {f"{report}/{name}" for name in ("report.csv", "report.md", "metric_vs_macs.png", "metric_vs_step.png")} <= {
        f"gs://{BUCKET}/{name}" for name in gcs.objects("sweeps/gcs/report/")
    }
    rows = _csv_rows(f"{report}/report.csv")
    assert (rows["resumed"]["state"], rows["resumed"]["step"], rows["new"]["state"]) == ("finished", "6", "new")
    final_top1 = run_files.last_eval_metrics(local_metrics)["eval/top1"]
    assert float(rows["resumed"]["final eval/top1"]) == final_top1

    out_file = tmp_path / "model.onnx"
    status, out, err = mnv2("export", "--workdir", workdir, "--format", "onnx", "--out", out_file)
    assert status == 0 and f"exported {workdir} (step 6) as onnx" in out, err[-3000:]
    metadata = json.loads(out_file.with_name("model.onnx.metadata.json").read_text())
    assert metadata["source"] == {"workdir": workdir, "step": 6}
    config, _, variables = inference.load_model(local)  # the same weights, read from the local workdir
    images = random_inputs(config)
    session = onnxruntime.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(["logits"], {"images": images})[0], jax_logits(config, variables, images), atol=1e-4
    )
