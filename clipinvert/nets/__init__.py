"""Networks, written to the released checkpoints' state-dict layouts."""

from .adapter import CLIPAdapter
from .e4e import Encoder4Editing
from .irse import IRSEBackbone
from .latent_discriminator import LatentDiscriminator
from .stylegan2 import Generator, GeneratorConfig

__all__ = ["CLIPAdapter", "Encoder4Editing", "Generator", "GeneratorConfig", "IRSEBackbone",
           "LatentDiscriminator"]
