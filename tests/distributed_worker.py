"""Run by tests/test_distributed.py under torchrun (``--nproc-per-node 2``, gloo on the CPU):
``distributed_worker.py CASE OUT``. Each process writes what it computed to ``OUT/rank<r>.pt``.

Cases, all in float64 so that the comparison with one process sees the order of additions only:
- ``parts``: the two batch-coupled pieces on this process's half of a fixed batch, in
  DistributedDataParallel: a convolution and :class:`GlobalBatchNorm2d` (outputs, averaged
  gradients, running statistics), and the stage-1 MS-SSIM loss of a convolution (loss, averaged
  gradients); each also with this process's statistics only, the naive result the test shows wrong.
- ``train``: both training stages, two epochs of two steps each, on synthetic data.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from crossfuse_fast.data import SyntheticPairs
from crossfuse_fast.distributed import GlobalBatchNorm2d, Ranks
from crossfuse_fast.losses import autoencoder_loss_terms
from crossfuse_fast.reference import AutoEncoder, FusionNet
from crossfuse_fast.train import train_autoencoder, train_fusion


def batch(seed: int) -> torch.Tensor:
    """The fixed global batch of 4 images the ``parts`` case splits (0..255, 40 x 40), darker in
    its first half, so that each half's statistics differ from the whole batch's."""
    brightness = torch.tensor([0.2, 0.4, 0.8, 1.0], dtype=torch.float64)[:, None, None, None]
    return torch.rand(4, 1, 40, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 255 * brightness


def norm_network(norm: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 3, 3), norm(3)).double()


def conv_network() -> nn.Conv2d:
    torch.manual_seed(4)
    return nn.Conv2d(1, 1, 3, padding=1).double()


def ddp_gradients(network: nn.Module, loss) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``loss(wrapped)`` and the parameters' gradients after DDP's averaging."""
    wrapped = DistributedDataParallel(network, broadcast_buffers=False)
    value = loss(wrapped)
    value.backward()
    return value.detach(), [p.grad.clone() for p in network.parameters()]


def parts(ranks: Ranks) -> dict:
    half = slice(2 * ranks.rank, 2 * ranks.rank + 2)
    images = batch(1)[half]
    weights = torch.rand(4, 3, 38, 38, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[half]
    result = {}
    for name, norm in (("global", GlobalBatchNorm2d), ("local", nn.BatchNorm2d)):
        network = norm_network(norm)
        outputs = []

        def loss(wrapped):
            output = wrapped(images)
            outputs.append(output.detach())
            return (output * weights).mean()
        _, gradients = ddp_gradients(network, loss)
        result[f"norm_{name}"] = {"output": outputs[0], "gradients": gradients,
                                  "running": [network[1].running_mean, network[1].running_var]}
    for name, shared in (("global", ranks), ("local", None)):
        value, gradients = ddp_gradients(conv_network(),
                                         lambda wrapped: autoencoder_loss_terms(wrapped, images, shared)["loss"])
        result[f"msssim_{name}"] = {"loss": value, "gradients": gradients}
    return result


class Float64(Dataset):
    """A dataset's items in float64."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return tuple(x.double() for x in item) if isinstance(item, tuple) else item.double()


def initial() -> tuple[AutoEncoder, AutoEncoder, AutoEncoder, FusionNet]:
    """The ``train`` case's start: the two frozen encoders, the autoencoder and the fusion network."""
    torch.manual_seed(5)
    return AutoEncoder().double(), AutoEncoder().double(), AutoEncoder().double(), FusionNet().double()


def stage_two_data() -> Dataset:
    return Float64(SyntheticPairs(8, 32))


def train(out: Path) -> dict:
    quiet = dict(backend="reference", epochs=2, max_steps=2, log=lambda line: None)
    ir_encoder, vis_encoder, autoencoder, fusion = initial()
    train_autoencoder(Float64(SyntheticPairs(8, 32, modality="ir")), out / "stage1", batch_size=4,
                      autoencoder=autoencoder, **quiet)
    train_fusion(stage_two_data(), ir_encoder, vis_encoder, out / "stage2", batch_size=4, fusion=fusion, **quiet)
    return {"autoencoder": autoencoder.state_dict(), "fusion": fusion.state_dict()}


def main(case: str, out: Path) -> None:
    dist.init_process_group("gloo")
    ranks = Ranks.current()
    result = parts(ranks) if case == "parts" else train(out)
    torch.save(result, out / f"rank{ranks.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
