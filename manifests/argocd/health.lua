-- Argo CD health of privatefm.io LearnerNamespaces and AdapterMerges (both kinds use this script).
-- It reads status the way kstatus does (sigs.k8s.io/cli-utils/pkg/kstatus/status), so Argo CD and
-- kstatus-based tools (Flux, kpt, cli-utils) agree: Healthy = Current, Progressing = InProgress,
-- Degraded = Failed. tests/test_gitops_health.py checks that on statuses captured from the suite.
local hs = {status = "Progressing", message = "Waiting for the privatefm operator to observe this object"}
local meta = obj.metadata or {}
if meta.deletionTimestamp ~= nil then
  hs.message = "Being deleted"
  return hs
end
local status = obj.status
-- No status, or one the operator has not written for this generation. (The CRD defaults a missing
-- status to observedGeneration 0, so the API server never serves an object without one.)
if status == nil or status.observedGeneration == nil then
  return hs
end
if meta.generation ~= nil and status.observedGeneration ~= meta.generation then
  hs.message = "Generation " .. tostring(meta.generation) .. " is not observed yet (observed "
    .. tostring(status.observedGeneration) .. ")"
  return hs
end
local conditions = status.conditions or {}
-- As kstatus: the first of Reconciling=True or Stalled=True, in list order, decides.
for _, c in ipairs(conditions) do
  if c.type == "Reconciling" and c.status == "True" then
    hs.status = "Progressing"
    hs.message = c.message or c.reason or "Reconciling"
    if hs.message == "" then hs.message = c.reason or "Reconciling" end
    return hs
  end
  if c.type == "Stalled" and c.status == "True" then
    hs.status = "Degraded"
    hs.message = c.message or c.reason or "Stalled"
    if hs.message == "" then hs.message = c.reason or "Stalled" end
    return hs
  end
end
for _, c in ipairs(conditions) do
  if c.type == "Ready" then
    if c.status == "True" then
      hs.status = "Healthy"
      hs.message = c.message or "Ready"
      if hs.message == "" then hs.message = c.reason or "Ready" end
    else
      hs.status = "Progressing"
      hs.message = c.message or c.reason or "Not ready"
      if hs.message == "" then hs.message = c.reason or "Not ready" end
    end
    return hs
  end
end
-- No kstatus condition at all: kstatus takes that for Current.
hs.status = "Healthy"
hs.message = "Observed"
return hs
