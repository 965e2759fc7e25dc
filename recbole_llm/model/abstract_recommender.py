"""What an LLM-based sequential recommender tells the LLMTrainer: its frozen backbones and its training stages."""

from dataclasses import dataclass

from recbole.model.abstract_recommender import SequentialRecommender

from recbole_llm.errors import RecBoleLLMError


@dataclass(frozen=True)
class TrainingStage:
    """One stage of training: the trainer runs stages in order, each with validation and early stopping."""

    name: str
    epochs: int


class LLMSequentialRecommender(SequentialRecommender):
    """A RecBole SequentialRecommender around frozen backbones (an LLM, a CF model), trained in stages.

    Subclasses say which modules are frozen, which stages they train in, and what happens at the start of a stage,
    an epoch and an evaluation (e.g. computing the item matrix once). Checkpoints hold everything but the frozen
    backbones' weights, so a checkpoint is megabytes, not the LLM.
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.stage = None

    def frozen_modules(self):
        """Modules whose weights never train (their parameters have requires_grad False)."""
        return []

    def training_stages(self):
        return [TrainingStage("train", self.config["epochs"])]

    def set_stage(self, name):
        """Switch behaviour to a stage without computing anything (also used when a checkpoint is loaded)."""
        self.stage = name

    def begin_stage(self, name):
        """Called by the trainer when a stage starts training."""
        self.set_stage(name)

    def begin_epoch(self, epoch_idx):
        """Called by the trainer before each training epoch."""

    def begin_evaluation(self):
        """Called by the trainer once before each evaluation (valid or test), before any batch is scored."""

    def end_evaluation(self):
        """Called by the trainer once after each evaluation, when every batch has been scored (e.g. to log it)."""

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # frozen backbones keep dropout off
        return self

    def _frozen_tensor_ids(self):
        return {
            id(tensor)
            for module in self.frozen_modules()
            for tensor in (*module.parameters(), *module.buffers())
            if not tensor.requires_grad
        }

    def checkpoint_state_dict(self):
        """The state dict without the frozen backbones' weights."""
        frozen = self._frozen_tensor_ids()
        return {k: v.detach() for k, v in self.state_dict(keep_vars=True).items() if id(v) not in frozen}

    def load_checkpoint_state_dict(self, state_dict):
        frozen_keys = {k for k, v in self.state_dict(keep_vars=True).items() if id(v) in self._frozen_tensor_ids()}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        wrong = [k for k in missing if k not in frozen_keys] + list(unexpected)
        if wrong:
            raise RecBoleLLMError(
                f"checkpoint does not fit this {type(self).__name__} ({len(wrong)} mismatched weights, e.g. "
                f"{wrong[0]}): it was trained with other model settings; use the settings it was trained with"
            )
