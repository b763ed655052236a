"""Training: the per-worker loop, optimizers and schedules, checkpoints, TorchTrainer wiring.

Named `training` so that it never shadows the public function `raysft.train`.
"""
