"""Fault injection for the NaN-loss tests: engagerec's train pipeline, reporting a NaN loss for
its second task at one step. Used in process (test_faults.py) and by one rank of a torchrun
launch (test_torchrun.py), whose script puts this folder on sys.path."""

import torch


def pipeline_with_nan_at(step: int):
    """A subclass of ``engagerec.train.TrainPipelineSparseDist`` whose ``progress`` returns a NaN
    as the second task's loss at its ``step``-th call (counted from 1) and the real losses
    otherwise; assign it to ``engagerec.train.TrainPipelineSparseDist`` before training."""
    import engagerec.train as training

    class NanAtStep(training.TrainPipelineSparseDist):
        steps = 0

        def progress(self, batches):
            task_losses, *rest = super().progress(batches)
            NanAtStep.steps += 1
            if NanAtStep.steps == step:
                task_losses = torch.tensor([task_losses[0].item(), float("nan")])
            return (task_losses, *rest)

    return NanAtStep
