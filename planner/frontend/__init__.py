"""The frontend: model configs (the zoo), building transformers models on meta, tracing them with
torch.fx, recognising module roles structurally, the model's shape, and the staged program."""
