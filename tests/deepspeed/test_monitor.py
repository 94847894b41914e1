"""ds_chunkflow.deepspeed.monitor.write_events: every monitor gets the metrics, wandb on DeepSpeed's own step axis."""

from types import SimpleNamespace

from ds_chunkflow.deepspeed.monitor import write_events


class _Recorder:
    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


def test_wandb_gets_deepspeeds_sample_axis_and_the_rest_the_optimizer_step():
    """csv / tensorboard see the optimizer step; wandb (one monotonic step per run, shared with DeepSpeed's
    Train/Samples events at global_samples) sees global_samples, plus the optimizer step as a metric."""
    csv, tb, wandb = _Recorder(), _Recorder(), _Recorder()
    monitor = SimpleNamespace(csv_monitor=csv, tb_monitor=tb, wandb_monitor=wandb, comet_monitor=None)
    write_events(monitor, {"loss": 1.5, "tokens": 10.0}, step=3, wandb_step=12)
    assert csv.events == tb.events == [("Train/chunkflow/loss", 1.5, 3), ("Train/chunkflow/tokens", 10.0, 3)]
    assert wandb.events == [("Train/chunkflow/loss", 1.5, 12), ("Train/chunkflow/tokens", 10.0, 12),
                            ("Train/chunkflow/optimizer_step", 3.0, 12)]
