"""Everything that talks to Ray (the only package importing it): Ray Train workers, the embedded
local instance, a local cluster head, job submission."""
