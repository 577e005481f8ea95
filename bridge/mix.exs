defmodule Mix.Tasks.Compile.SidecarNative do
  @moduledoc """
  Builds the bridge's C parts with the system C compiler, no hex package: the NIF
  (`c_src/sidecar_nif.c` -> `priv/sidecar_nif.so`, shared-memory segments as BEAM binaries) and
  the launcher (`c_src/sidecar_launch.c` -> `priv/sidecar_launch`, hands a Port's pipes to a
  forked worker). Both go into the app's build directory (`_build/<env>/lib/sidecar_bridge/priv`).

  Without a compiler (`$CC`, else `cc`) or without `erl_nif.h` (Debian: `apt-get install -y
  erlang-dev`) it says so and builds nothing: the bridge then reads and writes segments as files
  and starts every worker cold. `$SIDECAR_NATIVE_CFLAGS` adds flags (e.g. `-fsanitize=address -g`);
  a change of flags or sources rebuilds.
  """
  use Mix.Task.Compiler

  @targets [
    {"sidecar_nif.so", "c_src/sidecar_nif.c", ~w(-fPIC -shared -pthread)},
    {"sidecar_launch", "c_src/sidecar_launch.c", []}
  ]

  @impl true
  def run(_args) do
    priv = Path.join(Mix.Project.app_path(), "priv")
    File.mkdir_p!(priv)

    with {:ok, cc} <- compiler(),
         {:ok, include} <- nif_include() do
      extra = String.split(System.get_env("SIDECAR_NATIVE_CFLAGS", ""))
      results = for target <- @targets, do: build(cc, include, extra, priv, target)
      if Enum.all?(results, &(&1 == :noop)), do: {:noop, []}, else: {:ok, []}
    else
      {:skip, why} ->
        Mix.shell().info([:yellow, "sidecar_bridge: #{why}; the NIF and the launcher are not built, the bridge uses its file I/O path and cold worker starts"])
        {:noop, []}
    end
  end

  defp compiler do
    cc = System.get_env("CC") || "cc"

    case System.find_executable(cc) do
      nil -> {:skip, "no C compiler (#{inspect(cc)} is not on the PATH; set $CC)"}
      path -> {:ok, path}
    end
  end

  # erl_nif.h of the running emulator: erts-<version>/include under the OTP root (Debian's
  # erlang-dev also links it into <root>/usr/include).
  defp nif_include do
    root = to_string(:code.root_dir())
    erts = Path.join([root, "erts-#{:erlang.system_info(:version)}", "include"])

    case Enum.find([erts, Path.join(root, "usr/include")], &File.exists?(Path.join(&1, "erl_nif.h"))) do
      nil -> {:skip, "erl_nif.h not found under #{root} (install the Erlang headers: apt-get install -y erlang-dev)"}
      dir -> {:ok, dir}
    end
  end

  defp build(cc, include, extra, priv, {out, src, flags}) do
    target = Path.join(priv, out)
    args = ~w(-O2 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror) ++ flags ++ extra ++ ["-I", include, "-o", target, src]
    stamp = target <> ".cmd"
    command = Enum.join([cc | args], " ")

    if File.exists?(target) and File.read(stamp) == {:ok, command} and not Mix.Utils.stale?([src], [target]) do
      :noop
    else
      File.rm(target)

      case System.cmd(cc, args, stderr_to_stdout: true) do
        {_, 0} ->
          File.write!(stamp, command)
          Mix.shell().info("sidecar_bridge: built #{Path.relative_to_cwd(target)}")
          :ok

        {output, status} ->
          Mix.raise("sidecar_bridge: #{cc} failed (exit #{status}) building #{src}:\n#{output}")
      end
    end
  end
end

defmodule SidecarBridge.MixProject do
  use Mix.Project

  # No hex dependencies on purpose: many deployments (and our CI) cannot fetch packages.
  def project do
    [
      app: :sidecar_bridge,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:sidecar_native | Mix.compilers()],
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
