defmodule Sidecar.Resources do
  @moduledoc """
  Resident objects of a pool (a model kept on the GPU): loaded once per worker by a loader the
  workers' ops modules declare (`@sidecar.resource("name")` in Python), read by ops with
  `ctx.resource(name)`.

      {:ok, infos} = Sidecar.load(pool, "encoder", "my_ops.load_encoder", args: [checkpoint: path])
      {:ok, %Sidecar.Result{}} = Sidecar.call(pool, "encode", [tokens])
      {:ok, freed} = Sidecar.unload(pool, "encoder")

  The pool remembers each load as a recipe (the loader and its arguments, never the bytes) and
  every new worker (forked from the template, a spare, started cold) replays the recipes before
  it is routable; a worker that cannot restore is killed (classification `:restore_failed`) and
  replaced like a worker that failed to start. A load is all or nothing: when one worker refuses,
  the others unload again and the error (`:resource_failed` or `:out_of_memory`, naming the
  worker's os pid) is returned. Telemetry: `[:sidecar, :resource, :loaded | :unloaded | :restored |
  :restore_failed]`.
  """

  alias Sidecar.{Error, Exit, Pool.Manager, Telemetry, Worker}

  @default_timeout 120_000

  @doc """
  Runs `loader` with `args` (a keyword list or map: `checkpoint: path, dtype: "float16"`) on every
  worker and spare of `pool`, keeping its object as `name`. `{:ok, infos}`: one map per worker
  (`os_pid`, `device`, `host_bytes`, `device_bytes`, `load_ns`, `already_loaded`, ...).
  Options: `:args`, `:timeout` (ms per worker, default 120 000).
  """
  @spec load(atom, String.t(), String.t(), keyword) :: {:ok, [map]} | {:error, Error.t()}
  def load(pool, name, loader, opts \\ []) do
    opts = Keyword.validate!(opts, args: [], timeout: @default_timeout)
    recipe = %{name: to_string(name), loader: to_string(loader), kwargs: Map.new(opts[:args])}

    case Manager.put_recipe(pool, recipe) do
      {:error, old} ->
        {:error,
         Error.new(:resource_failed, "resource #{recipe.name} is already loaded in this pool (by #{old.loader}) " <>
           "with another recipe; unload it first", resource: recipe.name, loader: recipe.loader, cause: "already_loaded")}

      {:ok, _version} ->
        req = {:load, nil, recipe.name, recipe.loader, recipe.kwargs}
        t0 = System.monotonic_time()
        first = each_worker(pool, req, opts[:timeout])
        # A worker that registered while these ran may have looked at the recipes just before this
        # one was added: it gets the load too (one that restored it answers already_loaded).
        results = first ++ each_worker(pool, req, opts[:timeout], Enum.map(first, &elem(&1, 0)))

        case Enum.find(results, fn {_os_pid, r} -> refused?(r) end) do
          nil ->
            infos = for {_, {:ok, info, os_pid}} <- results, do: Map.put(info, :os_pid, os_pid)

            Telemetry.execute([:sidecar, :resource, :loaded], %{duration: System.monotonic_time() - t0, workers: length(infos)},
              %{pool: pool, name: recipe.name, loader: recipe.loader})

            {:ok, infos}

          failed ->
            Manager.drop_recipe(pool, recipe.name)
            each_worker(pool, {:unload, nil, recipe.name}, opts[:timeout])
            {:error, named(failed, recipe)}
        end
    end
  end

  @doc """
  Forgets the recipe of `name` and frees it on every worker: `{:ok, %{workers:, host_bytes_freed:,
  device_bytes_freed:, device_reserved_freed:}}`, or `:resource_failed` when the pool never loaded it.
  """
  @spec unload(atom, String.t(), keyword) :: {:ok, map} | {:error, Error.t()}
  def unload(pool, name, opts \\ []) do
    opts = Keyword.validate!(opts, timeout: @default_timeout)

    case Manager.drop_recipe(pool, to_string(name)) do
      :error ->
        {:error, Error.new(:resource_failed, "resource #{name} is not loaded in this pool", resource: to_string(name),
           cause: "not_loaded")}

      {:ok, _} ->
        done = for {_, {:ok, r, _}} <- each_worker(pool, {:unload, nil, to_string(name)}, opts[:timeout]), do: r
        sum = fn key -> done |> Enum.map(&(&1[key] || 0)) |> Enum.sum() end

        freed = %{workers: length(done), host_bytes_freed: sum.(:host_bytes_freed),
                  device_bytes_freed: sum.(:device_bytes_freed), device_reserved_freed: sum.(:device_reserved_freed)}

        Telemetry.execute([:sidecar, :resource, :unloaded], freed, %{pool: pool, name: to_string(name)})
        {:ok, freed}
    end
  end

  @doc "The pool's recipes (`%{name:, loader:, kwargs:}`), in load order."
  @spec list(atom) :: [map]
  def list(pool), do: elem(Manager.recipes(pool), 1)

  @doc "What one worker holds: `{:ok, %{resources: [...], sessions: [...]}}`."
  @spec of_worker(pid, timeout) :: {:ok, map} | {:error, term}
  def of_worker(pid, timeout \\ 10_000) do
    case Worker.request(pid, {:list_resources, nil}, timeout) do
      {:ok, listing, _os_pid} -> {:ok, listing}
      other -> other
    end
  end

  # Serving workers and spares (but those of `done`, os pids), at once; each one's os pid and answer.
  defp each_worker(pool, req, timeout, done \\ []) do
    reg = Sidecar.Pool.registry(pool)

    (Registry.lookup(reg, :ready) ++ Registry.lookup(reg, :spare))
    |> Enum.reject(fn {_pid, meta} -> meta.os_pid in done end)
    |> Task.async_stream(fn {pid, meta} -> {meta.os_pid, Worker.request(pid, req, timeout)} end,
      timeout: :infinity, ordered: true)
    |> Enum.map(fn {:ok, r} -> r end)
  end

  # A worker's refusal (its loader raised, out of memory) or a crash the loader can have caused;
  # a worker killed from outside is no refusal: its replacement replays the recipe.
  defp refused?({:error, %Error{kind: :worker_crashed, classification: c}}), do: Exit.caused_by_work?(c)
  defp refused?({:error, %Error{}}), do: true
  defp refused?({:error, :timeout}), do: true
  defp refused?(_), do: false

  defp named({os_pid, {:error, %Error{} = err}}, recipe),
    do: %{err | message: "worker #{os_pid}: #{err.message}", pid: err.pid || os_pid,
                resource: err.resource || recipe.name, loader: err.loader || recipe.loader}

  defp named({os_pid, {:error, :timeout}}, recipe),
    do: Error.new(:cancelled, "worker #{os_pid}: loading #{recipe.name} timed out", resource: recipe.name,
          loader: recipe.loader, pid: os_pid)
end
