"""Drop-in modules: same constructor arguments, defaults and state_dict keys as their torch.nn twins."""
from .activation import MultiheadAttention
from .normalization import AddNorm, LayerNorm, RMSNorm
from .rnn import GRU, GRUCell
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
                          TransformerEncoderLayer)

__all__ = ["AddNorm", "GRU", "MultiheadAttention", "GRUCell", "LayerNorm", "RMSNorm", "Transformer",
           "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer"]
