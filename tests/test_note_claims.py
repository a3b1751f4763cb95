"""Claims the notes make in words, checked by running the code they describe (torch's included).

Numbers are checked by tests/test_notes.py; these are the sentences a number cannot carry:
each test names the note it backs, and fails if the library or the model stops behaving so.
"""

import inspect
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.fsdp import fully_shard

from journey_dist.config import GPTConfig
from journey_dist.model import GPT


def _rendezvous(store, addr: str, ranks: dict, joined: threading.Event) -> None:
    params = RendezvousParameters(backend="c10d", endpoint="localhost:0", run_id="job", min_nodes=2,
                                  max_nodes=2, local_addr=addr, join_timeout="30")
    handler = create_handler(store, C10dRendezvousBackend(store, "job"), params)
    joined.set()
    ranks[addr] = handler.next_rendezvous().rank


def test_c10d_rendezvous_ranks_nodes_by_sorted_address_not_join_order():
    """notes/reliability.md: torch's c10d rendezvous sorts the participants (host, pid, id)."""
    store, ranks = dist.HashStore(), {}
    first_in, second_in = threading.Event(), threading.Event()
    late = threading.Thread(target=_rendezvous, args=(store, "127.0.0.1", ranks, second_in))
    early = threading.Thread(target=_rendezvous, args=(store, "localhost", ranks, first_in))
    early.start()
    assert first_in.wait(30)
    time.sleep(0.3)  # "localhost" is waiting in the rendezvous before "127.0.0.1" joins
    late.start()
    early.join(60)
    late.join(60)
    assert ranks == {"127.0.0.1": 0, "localhost": 1}  # "127..." < "localhost": sorted, not first come


def test_fsdp2_reshard_after_forward_defaults_to_none():
    """notes/zero.md: None = True for every unit but the root (torch 2.13's fully_shard)."""
    default = inspect.signature(fully_shard).parameters["reshard_after_forward"].default
    assert default is None


def test_attention_without_positions_bidirectional_is_equivariant_causal_sees_order():
    """notes/attention.md: permuting the tokens permutes unmasked attention's outputs (no order);
    the causal mask alone makes the model's prediction depend on the order (wpe set to zero)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=8, block_size=8)).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    dog_bites_man, man_bites_dog = torch.tensor([[1, 2, 3]]), torch.tensor([[3, 2, 1]])
    reverse = torch.tensor([2, 1, 0])
    attn = model.transformer.h[0].attn
    x = model.transformer.wte(dog_bites_man)
    q, k, v = (t.view(1, 3, 2, 8).transpose(1, 2) for t in attn.c_attn(x).split(16, dim=2))
    qr, kr, vr = (t[:, :, reverse] for t in (q, k, v))
    full = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(F.scaled_dot_product_attention(qr, kr, vr), full[:, :, reverse], atol=1e-6)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(F.scaled_dot_product_attention(qr, kr, vr, is_causal=True),
                              causal[:, :, reverse], atol=1e-3)
    with torch.no_grad():
        a, b = model(dog_bites_man)[0][0, -1], model(man_bites_dog)[0][0, -1]
    assert (a - b).abs().max() > 1e-3  # different next-token logits: order was seen
