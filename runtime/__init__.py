"""Executes a plan on local processes with torch.distributed."""
