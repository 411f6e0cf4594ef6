"""icm-dist: learning independent causal mechanisms with competing experts, sharded across ranks.

Shape letters, one legend for the whole code base (a tensor's name ends in its shape: ``scores_BN``,
``x_BCHW``, ``won_E``):

- ``B``: examples (a batch, or any set of examples: the test split, a probe set)
- ``C``: image channels (1 grey, 3 colour; a literal ``1`` where there is one); ``H``, ``W``: image height and width
- ``EC`` side by side: the expert bank's layout ``[B, E*C, H, W]``, expert ``j`` owning channels ``[j*C, (j+1)*C)``
- ``N``: experts of the whole committee (the paper's N'), addressed by global id
- ``E``: experts of this rank (its block of the committee), addressed by local index
- ``M``: mechanisms
- ``R``: ranks; ``K``: the largest block of experts on any rank (what gathered scores are padded to)

Words that mean one thing: ``dist`` is the process-group helper (:class:`icm_dist.dist.Dist`),
``disc`` the discriminator (``disc_opt``, ``disc_loss``), ``width`` an expert's filters per layer,
``world_size`` the number of ranks. docs/architecture.md follows one training step through the files.
"""

__version__ = "0.1.0"
