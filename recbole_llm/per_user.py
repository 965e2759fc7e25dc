"""Each evaluated user's metrics, beside the averages RecBole reports: what paired comparisons between models need.

RecBole's Collector keeps one row per evaluated user (the hits in the top k, ties broken by ``torch.topk`` as its
metrics break them) and its Evaluator averages each metric over those rows. Here the collector also keeps the rows'
user ids, and the evaluator keeps the per-user values it averaged, so that the mean of a model's per-user values is
the metric RecBole reports.
"""

import numpy as np
from recbole.evaluator import Collector, Evaluator
from recbole.evaluator.base_metric import TopkMetric

USER_ID_KEY = "data.user_id"


class PerUserCollector(Collector):
    """RecBole's Collector that also keeps the user id of every evaluated row."""

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        self.data_struct.update_tensor(USER_ID_KEY, interaction[self.config["USER_ID_FIELD"]])

    def get_data_struct(self):
        struct = super().get_data_struct()
        if USER_ID_KEY in self.data_struct:  # one evaluation's rows, as RecBole resets its own per-user keys
            del self.data_struct[USER_ID_KEY]
        return struct


class PerUserEvaluator(Evaluator):
    """RecBole's Evaluator that keeps, of its last evaluation, every top-k metric per user: ``per_user`` is
    {"user_id": [n_users], "<metric>@<k>": [n_users], ...}, None when the evaluation had no user ids. The values are
    those each metric hands to its own averaging step (TopkMetric.topk_result), so their means are RecBole's."""

    per_user = None

    def __init__(self, config):
        super().__init__(config)
        self._per_rank = {}  # metric name -> [n_users, max k], filled while the metrics compute
        for metric in self.metric_class.values():
            if isinstance(metric, TopkMetric):
                metric.topk_result = self._keeping_users(metric.topk_result)

    def _keeping_users(self, topk_result):
        def kept(name, value):
            self._per_rank[name] = value
            return topk_result(name, value)

        return kept

    def evaluate(self, dataobject):
        self._per_rank = {}
        result = super().evaluate(dataobject)
        self.per_user = None
        if USER_ID_KEY in dataobject:
            self.per_user = {"user_id": dataobject.get(USER_ID_KEY).numpy()}
            for name, per_rank in self._per_rank.items():
                self.per_user.update({f"{name}@{k}": np.asarray(per_rank[:, k - 1], dtype=np.float64)
                                      for k in self.config["topk"]})
        return result


class PerUserMetricsMixin:
    """A RecBole trainer whose evaluations keep their per-user metrics (``last_per_user``)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = PerUserCollector(config)
        self.evaluator = PerUserEvaluator(config)

    @property
    def last_per_user(self):
        """The per-user metrics of the last evaluation (see PerUserEvaluator.per_user)."""
        return self.evaluator.per_user
