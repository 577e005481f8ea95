defmodule Sidecar.Application do
  @moduledoc false
  # VM-wide parts every pool shares: the telemetry handler table, the registry of the VM's own
  # shared-memory segments (which unlinks them when their owner dies and when the application stops)
  # and the VM-exit cleanup (which stops the pools first: children stop in reverse order).
  use Application

  @impl true
  def start(_type, _args) do
    children = [Sidecar.Telemetry, Sidecar.Shm, Sidecar.Cleanup]
    Supervisor.start_link(children, strategy: :one_for_one, name: Sidecar.Supervisor)
  end
end
