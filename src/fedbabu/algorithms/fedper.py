"""FedPer: the body is averaged and every client trains the whole network, in two forms.

* ``fedper.keep_head: true`` (the default) is FedPer as Arivazhagan et al. (2019) publish it: each
  client keeps the head it trains, never sends it, and is evaluated and fine-tuned with it.
* ``fedper.keep_head: false`` is FedPer as the FedBABU authors run it (``main_fed.py --local_upt_part
  full --aggr_part body``): a client trains the body and the head together, but only the averaged
  body is written back into its model, so the head it trained is thrown away every round. Every
  client therefore keeps the initial head, and fine-tuning starts from the final body and that head.
  It differs from FedBABU only in that the head is trained during the round (and moves the body's
  gradients) before being discarded. Their ``baselines`` comparisons run this form.

The default is the published method, because a user who asks for FedPer by name expects the
personal heads the name stands for; the presets that reproduce the FedBABU paper name the other form.
"""


from fedbabu.algorithms.base import Algorithm
from fedbabu.config import AlgorithmSettings, Config


class FedPer(Algorithm):
    name = "fedper"
    shared_parts = ("body",)
    trained_parts = ("body", "head")
    personal_parts = ("head",)

    class Settings(AlgorithmSettings):
        keep_head: bool = True
        """Each client keeps the head it trains (Arivazhagan et al.); false discards it after every
        round, so every client keeps the initial head (the FedBABU authors' ``main_fed.py``)."""

    settings: Settings

    def __init__(self, config: Config) -> None:
        if not config.settings_for(self.name).keep_head:
            self.personal_parts = ()
        super().__init__(config)
