"""Pre-LayerNorm BERT with progressive layer dropping: the paper's "switchable transformer".

The block is LN -> attention -> residual; LN -> FFN -> residual, with a final LN after the
encoder, not BERT's post-LN block, so a PLD run trains a different architecture and the
comparison says so (docs/methods.md). In train mode each layer gets one Bernoulli draw per
forward (= per mini-batch) with the keep probabilities of `cached_mslt.methods.pld`; a
dropped layer is skipped (no compute, no gradient, identity on the residual stream) and a
kept layer's two sublayer outputs are divided by p_i before their residual adds. Eval mode
runs every layer unscaled.

Draws come from a generator owned by the model and seeded by `config.layer_drop_seed`, so
data-parallel ranks that run the same number of training forwards drop the same layers.
Under DDP the skipped layers' parameters get no gradient that step:
use `find_unused_parameters=True`.

Importing this module registers the model with the Auto classes (`model_type`
"preln-bert"): `AutoConfig`, `AutoModelForMaskedLM` and `AutoModelForSequenceClassification`
load a saved run; the decoder stays tied to the word embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertOnlyMLMHead,
    BertPooler,
    BertPreTrainedModel,
    BertSelfAttention,
)

from cached_mslt.models.bert import mlm_head_loss


def layer_keep_probs(theta: float, num_layers: int) -> list[float]:
    """p_i = 1 - i * (1 - theta) / L for i = 0..L-1 (layer 0 is always kept)."""
    return [1.0 - i * (1.0 - theta) / num_layers for i in range(num_layers)]


class PreLNBertConfig(BertConfig):
    """BertConfig for the pre-LN switchable BERT; a distinct `model_type` so Auto classes find it."""

    model_type = "preln-bert"

    layer_drop_seed: int = 0


class _DenseDropout(nn.Module):
    """A sublayer's output projection without BERT's post-LN (the LN moved before the sublayer)."""

    def __init__(self, in_features: int, config: PreLNBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class _PreLNAttention(nn.Module):
    """Keeps BERT's `attention.self` / `attention.output` names so the Q/K/V weights map 1:1."""

    def __init__(self, config: PreLNBertConfig, layer_idx: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, layer_idx=layer_idx)
        self.output = _DenseDropout(config.hidden_size, config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None):
        context, _ = self.self(hidden_states, attention_mask)
        return self.output(context)


class PreLNBertLayer(nn.Module):
    """Pre-LN block; LayerNorm names follow DeepSpeedExamples' `modelingpreln_layerdrop.py`."""

    def __init__(self, config: PreLNBertConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.PreAttentionLayerNorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = _PreLNAttention(config, layer_idx)
        self.PostAttentionLayerNorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.intermediate = BertIntermediate(config)
        self.output = _DenseDropout(config.intermediate_size, config)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, keep: float = 1.0
    ) -> torch.Tensor:
        attn = self.attention(self.PreAttentionLayerNorm(hidden_states), attention_mask)
        hidden_states = hidden_states + (attn if keep == 1.0 else attn / keep)
        ffn = self.output(self.intermediate(self.PostAttentionLayerNorm(hidden_states)))
        return hidden_states + (ffn if keep == 1.0 else ffn / keep)


class PreLNBertEncoder(nn.Module):
    """The layer stack with the PLD draw, then the final LayerNorm."""

    def __init__(self, config: PreLNBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [PreLNBertLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.FinalLayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.theta = 1.0  # set by the loop each step; 1.0 = keep everything
        self.generator = torch.Generator().manual_seed(config.layer_drop_seed)
        self.last_layers_run = len(self.layer)  # for the FLOP counter

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        n = len(self.layer)
        probs, draws = [1.0] * n, [0.0] * n
        if self.training and self.theta < 1.0:
            probs = layer_keep_probs(self.theta, n)
            # One draw per layer per training forward (eval draws none, so it cannot shift
            # the sequence); CPU generator, so the draw needs no device sync.
            draws = torch.rand(n, generator=self.generator).tolist()
        self.last_layers_run = 0
        for layer, p, u in zip(self.layer, probs, draws):
            if u >= p:  # dropped: skipped outright, so it costs nothing and gets no gradient
                continue
            hidden_states = layer(hidden_states, attention_mask, keep=p)
            self.last_layers_run += 1
        return self.FinalLayerNorm(hidden_states)


class PreLNBertModel(nn.Module):
    """Embeddings + pre-LN encoder; `last_hidden_state` (B, T, H) is after the final LN.

    Returns a `BaseModelOutput` like `BertModel`, so a loop that reads
    `model.bert(...).last_hidden_state` and runs the head itself works on both models.
    """

    def __init__(self, config: PreLNBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = PreLNBertEncoder(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        embeddings = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=embeddings, attention_mask=attention_mask
        )
        return BaseModelOutput(last_hidden_state=self.encoder(embeddings, mask))


class PreLNBertForMaskedLM(BertPreTrainedModel):
    """Pre-LN BERT with progressive layer dropping and BERT's MLM head (`cls`), decoder tied."""

    # An attribute, not the `config:` annotation transformers also reads: under
    # `from __future__ import annotations` that annotation would be a string.
    config_class = PreLNBertConfig
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: PreLNBertConfig) -> None:
        super().__init__(config)
        self.bert = PreLNBertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_theta(self, theta: float) -> None:
        """Set this step's theta (from `keep_prob(step)`); 1.0 turns dropping off."""
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta must be in (0, 1], got {theta}")
        self.bert.encoder.theta = float(theta)

    @property
    def last_layers_run(self) -> int:
        """How many encoder layers the last forward ran (the FLOP counter's `trained_layers`)."""
        return self.bert.encoder.last_layers_run

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """With `labels`, the loss only: the head runs on the masked positions alone
        (`mlm_head_loss`); without, `logits` (B, T, vocab)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        if labels is None:
            return MaskedLMOutput(logits=self.cls(hidden))
        return MaskedLMOutput(loss=mlm_head_loss(self, hidden, labels)[0])


class PreLNBertForSequenceClassification(BertPreTrainedModel):
    """The pre-LN encoder under BERT's classification head (pooled [CLS] -> dropout ->
    linear), so PLD's checkpoints fine-tune like the others. The pooler has no pretrained
    weights here (nor in this project's BertForMaskedLM checkpoints): it starts random."""

    config_class = PreLNBertConfig

    def __init__(self, config: PreLNBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = PreLNBertModel(config)
        self.classifier = nn.Sequential(
            BertPooler(config),
            nn.Dropout(config.hidden_dropout_prob),
            nn.Linear(config.hidden_size, config.num_labels),
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(input_ids, attention_mask, token_type_ids).last_hidden_state
        logits = self.classifier(hidden)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(PreLNBertConfig.model_type, PreLNBertConfig, exist_ok=True)
AutoModelForMaskedLM.register(PreLNBertConfig, PreLNBertForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(
    PreLNBertConfig, PreLNBertForSequenceClassification, exist_ok=True
)
