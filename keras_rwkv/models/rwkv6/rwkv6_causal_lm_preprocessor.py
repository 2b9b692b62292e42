import keras
from keras_hub.layers import StartEndPacker
from keras_hub.models import CausalLMPreprocessor

from keras_rwkv.models.rwkv6.rwkv6_backbone import RWKV6Backbone
from keras_rwkv.models.rwkv6.rwkv6_tokenizer import RWKV6Tokenizer


@keras.saving.register_keras_serializable(package="keras_rwkv")
class RWKV6CausalLMPreprocessor(CausalLMPreprocessor):
    """RWKV6 causal LM preprocessor: strings to next-token training data,
    and prompts to left-padded generation inputs.

    For `fit`, each string is tokenized, followed by the end token (id 0)
    if `add_end_token`, right-padded with 0 to `sequence_length + 1`, and
    split into inputs and next-token labels: `x = {"token_ids",
    "padding_mask"}`, `y` = the ids shifted left by one, `sample_weight` =
    1 for real next tokens and 0 for pads. RWKV World models have no start
    token, so `add_start_token` defaults to False.

    `generate_preprocess` (KerasHub's API, e.g. to build token-id inputs
    for `generate`) left-pads (an RNN must read real tokens last), keeping
    the *last* `sequence_length` tokens of an over-long prompt.
    `RWKV6CausalLM.generate` itself only uses the tokenizer on string
    prompts and pads them in its own token buffer; `generate_postprocess`
    drops pads and id 0 and decodes its output.

    Works on plain Python strings and numpy arrays without TensorFlow, and
    on string tensors inside a `tf.data` pipeline.

    Args:
        tokenizer: an `RWKV6Tokenizer`.
        sequence_length: int. Length of the packed training inputs.
        add_start_token: bool. Prepend the start token (there is none in
            RWKV World: keep False).
        add_end_token: bool. Append id 0 after each training text, as
            RWKV World models were trained.

    Examples:
    ```python
    preprocessor = keras_rwkv.RWKV6CausalLMPreprocessor(
        keras_rwkv.RWKV6Tokenizer(), sequence_length=8
    )
    x, y, sample_weight = preprocessor(["The quick brown fox", "Hi"])
    prompts = preprocessor.generate_preprocess(["Hello", "你好"])
    ```
    """

    backbone_cls = RWKV6Backbone
    tokenizer_cls = RWKV6Tokenizer

    def __init__(
        self,
        tokenizer,
        sequence_length=1024,
        add_start_token=False,
        add_end_token=True,
        **kwargs,
    ):
        super().__init__(
            tokenizer,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )

    def build(self, input_shape):
        super().build(input_shape)  # the right-padding training packer
        self.generate_packer = StartEndPacker(
            start_value=self.tokenizer.start_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            return_padding_mask=True,
            padding_side="left",
        )

    def _generate_preprocess_python(self, x, sequence_length=None):
        if not self.built:
            self.build(None)
        sequence_length = sequence_length or self.sequence_length
        ids = self.tokenizer(x)
        # Keep the end of an over-long prompt: it is what the model must
        # continue from.
        if ids and isinstance(ids[0], list):
            ids = [seq[-sequence_length:] for seq in ids]
        else:
            ids = ids[-sequence_length:]
        token_ids, padding_mask = self.generate_packer(
            ids, sequence_length=sequence_length, add_end_value=False
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def _generate_preprocess_tf(self, x, sequence_length=None):
        if not self.built:
            self.build(None)
        sequence_length = sequence_length or self.sequence_length
        ids = self.tokenizer(x)
        ids = ids[..., -sequence_length:]
        token_ids, padding_mask = self.generate_packer(
            ids, sequence_length=sequence_length, add_end_value=False
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}
