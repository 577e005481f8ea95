defmodule Sidecar.Application do
  @moduledoc false
  # VM-wide parts every pool shares: the telemetry handler table and the registry of the VM's own
  # shared-memory segments (which unlinks them when their owner dies and when the application stops).
  use Application

  @impl true
  def start(_type, _args) do
    children = [Sidecar.Telemetry, Sidecar.Shm]
    Supervisor.start_link(children, strategy: :one_for_one, name: Sidecar.Supervisor)
  end
end
