import torch

# GPU checks (xformers against SDPA) need CUDA: on a CPU machine they are not collected at all
# rather than reported as skipped. `make test-gpu` runs them on a GPU machine.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]
