"""Random-weight stand-in for pytorch-fid's FID Inception weights, for offline tests and the demo.

The real weights (``pt_inception-2015-12-05-6726825d.pth``) are downloaded by pytorch-fid on first use; machines
without internet get this file instead. It has exactly the keys and shapes of the real state dict, so both
``sd3 fid --inception-weights FILE`` and the plain ``pytorch-fid`` command (once the file sits in the torch hub
cache, see :func:`install_inception_weights`) load it strictly.

Why not keep torchvision's untrained initialisation: its convolutions shrink the signal at every layer, so all
images map to nearly the same pool3 vector and every FID is ~0. Here each convolution is He-initialised (variance
preserving through the ReLUs) and BatchNorm is the identity with a small random bias, so different image sets give
clearly different features while identical sets still give FID ~0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def fid_inception_architecture() -> torch.nn.Module:
    """pytorch-fid's FID Inception module (as ``fid_inception_v3`` builds it) without loading any weights."""
    from pytorch_fid import inception as pf

    net = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    # The FID network swaps these blocks for TensorFlow-compatible variants (pytorch_fid.inception).
    net.Mixed_5b = pf.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf.FIDInceptionE_1(1280)
    net.Mixed_7c = pf.FIDInceptionE_2(2048)
    return net


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded, re-initialised state dict with the keys and shapes of pytorch-fid's FID Inception weights."""
    generator = torch.Generator().manual_seed(seed)
    net = fid_inception_architecture()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = (2.0 / fan_in) ** 0.5  # He init: keeps activations at unit scale through ReLU
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
                module.weight.fill_(1.0)
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.01)
                module.bias.zero_()
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def write_random_inception_weights(path: Path | str, seed: int = 0) -> Path:
    """Save :func:`random_inception_state_dict` to ``path`` (atomically) and return the path."""
    from sd3_lora_celeba.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(random_inception_state_dict(seed), tmp)
    return path


def install_inception_weights(weights: Path | str, torch_home: Path | str) -> Path:
    """Copy a weights file to where pytorch-fid looks for its download inside ``TORCH_HOME``.

    With ``TORCH_HOME=torch_home`` the plain ``pytorch-fid`` command then runs offline on these weights
    (``torch.hub.load_state_dict_from_url`` finds the file and skips the download).
    """
    from sd3_lora_celeba.evaluate.fid import FID_WEIGHTS_FILE

    target = Path(torch_home) / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target)
    return target
