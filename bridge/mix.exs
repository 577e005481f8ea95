defmodule SidecarBridge.MixProject do
  use Mix.Project

  # No hex dependencies on purpose: many deployments (and our CI) cannot fetch packages.
  def project do
    [
      app: :sidecar_bridge,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      deps: [],
      elixirc_paths: ["lib"],
      test_paths: ["test"]
    ]
  end

  def application do
    # :inets: OTP's :httpd serves Sidecar.Metrics (part of OTP, not a hex package).
    [extra_applications: [:logger, :inets], mod: {Sidecar.Application, []}]
  end
end
