"""Hyperparameter search inside one fleet: the trials of a sweep train side by side as adapters of
one fleet, sharing every pass over the frozen base; successive halving stops the worst at rungs."""
