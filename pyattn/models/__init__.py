"""Models built from pyattn.nn: the paper's encoder-decoder Transformer (``transformer``), the translation demo's
task and training loop (``translation_demo``), and the character GRU of ``pyattn demo gru`` (``char_gru``)."""
from .transformer import (EncoderDecoderTransformer, KVCache, LayerKVCache, TransformerConfig, decoder_layer_step,
                          sinusoidal_positional_encoding)

__all__ = ["EncoderDecoderTransformer", "KVCache", "LayerKVCache", "TransformerConfig", "decoder_layer_step",
           "sinusoidal_positional_encoding"]
