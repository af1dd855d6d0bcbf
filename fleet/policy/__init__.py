"""Degraded-mode fallback policies on the controller: versions, eligibility, assignment.

``store`` keeps immutable, validated versions of each named policy; ``eligibility``
says, purely, why a device cannot take a policy; ``assign`` gives a policy to a group
or a device by putting it in each eligible device's signed desired state
(``DesiredState.fallback``); ``views`` answers the API's listings.
"""
