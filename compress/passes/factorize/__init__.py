"""``factorize``: DSFormer dense x sparse factorization with the Straight-Through Factorizer."""

from squeeze.compress.passes.factorize.dslinear import DSLinear
from squeeze.compress.passes.factorize.factorize_pass import FactorizeConfig, FactorizePass, FactorizeResult

__all__ = ["DSLinear", "FactorizeConfig", "FactorizePass", "FactorizeResult"]
