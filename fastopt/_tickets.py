"""The ticket counters of the step-increment fold (issue 18), shared by the CUDA and Triton backends.

Every block (program) of an optimizer launch reads its tensor's step counter as ``step + 1``, then takes
a ticket from an int32 counter; the one drawing the last ticket increments the step counters and puts
the counter back to 0 (csrc/include/fastopt/multi_tensor.cuh ``StepFold``;
triton_kernels/multi_tensor.py ``_fold_step_increment``).  So a counter is 0 between launches, and
launches that may run at the same time must not share one: there is one per (device, stream).  While a
CUDA stream is being captured into a graph and has no counter yet, the call gets a fresh one of its
own: its zero fill is captured with it (replayed before it), so it is never handed to eager launches,
whose counter must already be 0.  Counters are kept alive for good (a captured graph holds their
address).  A graph bakes in its counter: two graphs captured on one stream and replayed at the same time
on two streams would share it.
"""
import torch

_by_stream = {}  # (device type, index, stream handle or None) -> int32 zeros(1)
_captured = []  # counters made for calls captured into CUDA graphs


def step_ticket(device):
    """The int32 ticket counter (a 1-element tensor, 0 between launches) for launches on ``device``'s
    current stream."""
    device = torch.device(device)
    capturing = False
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        key = ("cuda", stream.device.index, stream.cuda_stream)
        capturing = torch.cuda.is_current_stream_capturing()
    else:
        key = (device.type, device.index, None)
    ticket = _by_stream.get(key)
    if ticket is not None:
        return ticket
    ticket = torch.zeros(1, dtype=torch.int32, device=device)
    if capturing:
        _captured.append(ticket)
    else:
        _by_stream[key] = ticket
    return ticket
