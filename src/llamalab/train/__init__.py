"""Pretraining: the loop, optimizer and schedule, parallelism (FSDP2, TP), metrics."""
