"""MultiMood: multimodal emotional-support dialogue on Hugging Face transformers.

Importing the package registers the configuration, the models and the processor with the Auto
classes, and marks them for `register_for_auto_class` so that `save_pretrained` writes `auto_map`
and copies the remote-code files.
"""

import logging

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMultimodalLM,
    AutoProcessor,
    AutoVideoProcessor,
)

from .model.configuration_multimood import BeatsConfig, MultimoodConfig
from .model.feature_extraction_multimood import MultimoodFeatureExtractor
from .model.modeling_beats import BeatsModel
from .model.modeling_multimood import MultimoodForConditionalGeneration, MultimoodModel, MultimoodPreTrainedModel
from .model.pipeline_multimood import EmotionalSupportPipeline, save_pipeline_files
from .model.processing_multimood import MultimoodDataCollator, MultimoodProcessor, parse_output
from .model.video_processing_multimood import MultimoodVideoProcessor

__version__ = "0.1.0"

# bitsandbytes (imported by peft and trl when installed) warns at import that it cannot fetch an optional CPU
# kernel from the Hub, which never works offline; its built-in kernel is used, so the line only confuses users
# of every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

AutoConfig.register(MultimoodConfig.model_type, MultimoodConfig, exist_ok=True)
AutoConfig.register(BeatsConfig.model_type, BeatsConfig, exist_ok=True)
AutoModel.register(MultimoodConfig, MultimoodModel, exist_ok=True)
AutoModel.register(BeatsConfig, BeatsModel, exist_ok=True)
AutoModelForCausalLM.register(MultimoodConfig, MultimoodForConditionalGeneration, exist_ok=True)
AutoModelForMultimodalLM.register(MultimoodConfig, MultimoodForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MultimoodConfig, MultimoodProcessor, exist_ok=True)
AutoVideoProcessor.register(MultimoodConfig, MultimoodVideoProcessor, exist_ok=True)
AutoFeatureExtractor.register(MultimoodConfig, MultimoodFeatureExtractor, exist_ok=True)

MultimoodConfig.register_for_auto_class()
MultimoodModel.register_for_auto_class("AutoModel")
MultimoodForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BeatsConfig",
    "BeatsModel",
    "EmotionalSupportPipeline",
    "MultimoodDataCollator",
    "MultimoodFeatureExtractor",
    "MultimoodProcessor",
    "MultimoodVideoProcessor",
    "MultimoodConfig",
    "MultimoodForConditionalGeneration",
    "MultimoodModel",
    "MultimoodPreTrainedModel",
    "parse_output",
    "save_pipeline_files",
]
