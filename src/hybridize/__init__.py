"""hybridize: turn a pretrained Qwen3 / Llama-family transformer into a Gated DeltaNet + gated-attention hybrid.

Importing the package registers `HybridConfig` / `HybridForCausalLM` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(converted_folder)` works.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .errors import HybridizeError
from .model.cache import HybridCache
from .model.config import HybridConfig
from .model.etd import ETDConfig, ETDForCausalLM, ETDHybridConfig, ETDModel
from .model.modeling import HybridForCausalLM, HybridModel
from .model.static_cache import StaticHybridCache
from .transfer.config import CrossArchTransferConfig, HybridAttentionConfig

AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModel.register(HybridConfig, HybridModel, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
AutoConfig.register(ETDHybridConfig.model_type, ETDHybridConfig, exist_ok=True)
AutoModel.register(ETDHybridConfig, ETDModel, exist_ok=True)
AutoModelForCausalLM.register(ETDHybridConfig, ETDForCausalLM, exist_ok=True)

from .train.config import DistillConfig  # noqa: E402
from .train.trainer import DistillationTrainer  # noqa: E402
from .transfer.convert import create_full_hybrid_model, create_hybrid_from_qwen3  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "CrossArchTransferConfig",
    "DistillConfig",
    "DistillationTrainer",
    "ETDConfig",
    "ETDForCausalLM",
    "HybridAttentionConfig",
    "HybridCache",
    "HybridConfig",
    "HybridForCausalLM",
    "HybridModel",
    "HybridizeError",
    "StaticHybridCache",
    "create_full_hybrid_model",
    "create_hybrid_from_qwen3",
]
