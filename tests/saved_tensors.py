"""What autograd keeps for the backward: the memory tests' one measurement (test_train_memory.py,
test_training_recompute.py)."""

import torch


def saved_bytes(model, forward) -> int:
    """Bytes of the tensors autograd saves while `forward()` runs (a forward with a loss), the model's parameters
    apart; each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())
