"""LXMERT (Tan & Bansal, EMNLP 2019), faithful to the authors' code and drop-in with transformers' names."""

from .config import LxmertConfig
from .finetune import LxmertForNLVR2, LxmertForNLVR2Output, LxmertForQuestionAnswering, LxmertForQuestionAnsweringOutput
from .modeling import LxmertModel, LxmertModelOutput
from .pretraining import LxmertForPreTraining, LxmertForPreTrainingOutput

__all__ = [
    "LxmertConfig",
    "LxmertModel",
    "LxmertModelOutput",
    "LxmertForPreTraining",
    "LxmertForPreTrainingOutput",
    "LxmertForQuestionAnswering",
    "LxmertForQuestionAnsweringOutput",
    "LxmertForNLVR2",
    "LxmertForNLVR2Output",
]
