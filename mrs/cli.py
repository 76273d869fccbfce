"""The `mrs` command line (Fire): thin commands over the library.

Every command validates its input; a user mistake prints one line to stderr and
exits non-zero, never a traceback. Human output goes through rich (tables, progress,
markdown); `--format json` gives machine-readable output where it makes sense.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import fire

from mrs.cli_args import UsageError, _choice, _int, _text
from mrs.cli_train import TrainCommands
from mrs.errors import ModelNotFoundError, MrsError

log = logging.getLogger("mrs")


def _refs(value: Any, name: str) -> list[str]:
    """--model a,b / --model '[a, b]' / repeated values -> a list of non-empty names."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    refs = [str(item).strip() for item in items if str(item).strip()]
    if not refs:
        raise UsageError(f"{name} needs a model name or folder")
    return refs


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal: do not squeeze tables into 80 columns; a script may be reading them.
    return Console(highlight=False, stderr=stderr, width=None if stream.isatty() else 200)


def _show(renderable: Any) -> None:
    """Print a rich renderable; into a pipe, without the trailing padding of table cells."""
    console = _console()
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, ensure_ascii=False))


class CLI(TrainCommands):
    """mrs — run, serve and inspect open LLMs (Llama, Mistral, Granite, Qwen, Phi, Gemma, Mamba, BERT) on JAX or MLX.

    Models: pull, search, list (ls), show (info), rm, cp, verify, checksums.
    Run: chat (run), generate, embed, serve, ps.  Settings: config.

    Global flags (any command): --home DIR (models directory, MRS_HOME), --device auto|cpu|gpu|tpu|mlx
    (MRS_DEVICE), --dtype auto|float32|bfloat16 (MRS_DTYPE), --quantize auto|int8|int4|none
    (MRS_QUANTIZE: auto runs GGUF files quantized; int8/int4 quantize dense weights at load; none
    dequantizes), --tensor-parallel N (MRS_TENSOR_PARALLEL: split each model over N devices, for
    generate, chat and serve), --verbose.
    """

    def __init__(self, home: str | None = None, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, tensor_parallel: Any = None, verbose: bool = False):
        self._flags = {"home": home, "device": device, "dtype": dtype, "quantize": quantize,
                       "tensor_parallel": tensor_parallel}
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")

    def _settings(self, **overrides: Any):
        from mrs.config import Settings

        flags = {k: v for k, v in self._flags.items() if v is not None}
        return Settings.load(**flags, **{k: v for k, v in overrides.items() if v is not None})

    def _load(self, model: str, adapter: Any = None):
        import mrs

        if not model:
            raise UsageError("--model is required (a folder path or an org/name in the models directory)")
        settings = self._settings()
        options = settings.load_options()
        if adapter is not None:
            options["adapter"] = Path(_text(adapter, "--adapter")).expanduser()
        return mrs.load(_text(model, "--model"), dtype=settings.dtype, device=settings.device, home=settings.home,
                        **options)

    # -- models on disk -------------------------------------------------------------------

    def pull(self, ref: Any, revision: Any = None, quiet: bool = False):
        """Download a model from the Hugging Face Hub into the models directory.

        Fetches only what mrs runs (safetensors, configs, tokenizer, chat template), or with
        ORG/NAME-GGUF:QUANT only that quant's .gguf file. An interrupted pull leaves nothing in
        `list`; pulling again resumes it.

        Args:
            ref: the Hub model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct or org/name-GGUF:Q4_K_M.
            revision: a branch, tag or commit (default: main).
            quiet: no progress bars.
        """
        from mrs import hub
        from mrs.render import PullProgress

        repo, quant = hub.split_ref(_text(ref, "REF"))
        name = f"{repo}:{quant}" if quant else repo
        revision = None if revision is None else _text(revision, "--revision")
        settings = self._settings()
        try:
            with PullProgress(_console(stderr=True)) as progress:
                path = hub.pull(name, settings.home, revision=revision, endpoint=settings.mirror or None,
                                on_progress=None if quiet else progress)
        except KeyboardInterrupt:
            print(f"interrupted: run `mrs pull {name}` again to resume", file=sys.stderr)
            raise
        print(f"pulled {name} into {path}")

    def download(self, ref: Any, revision: Any = None, quiet: bool = False):
        """Alias of pull."""
        return self.pull(ref, revision=revision, quiet=quiet)

    def search(self, query: Any = "", limit: Any = 20, task: str | None = None, format: str = "table"):
        """Search the Hub for models mrs can run (safetensors; text generation or embeddings).

        Args:
            query: words in the model name.
            limit: how many results (1-1000, default 20).
            task: only text-generation, feature-extraction or sentence-similarity.
            format: table or json.
        """
        from mrs import hub
        from mrs.render import search_table

        query = "" if query == "" else _text(query, "QUERY")
        limit = _int(limit, "--limit", 1, 1000)
        _choice(format, "--format", ("table", "json"))
        if task is not None:
            _choice(task, "--task", hub.SEARCH_TASKS)
        rows = hub.search(query, limit=limit, endpoint=self._settings().mirror or None, task=task)
        if format == "json":
            return _print_json(rows)
        if not rows:
            print(f"no models match {query!r}", file=sys.stderr)
            return
        _show(search_table(rows))

    def list(self, format: str = "table"):
        """List the models in the models directory, then Ollama's (marked): name, architecture, parameters, dtype, size.

        Args:
            format: table or json.
        """
        from mrs import store
        from mrs.render import models_table

        _choice(format, "--format", ("table", "json"))
        home = self._settings().home
        rows = []
        for path in store.list_models(home):
            try:
                rows.append(store.model_info(path))
            except MrsError as e:
                rows.append({"name": store.model_name(path), "path": str(path), "error": str(e)})
        from mrs import ollama_store

        rows += ollama_store.infos()
        if format == "json":
            return _print_json(rows)
        if not rows:
            print(f"no models in {home} — get one with `mrs pull org/name`", file=sys.stderr)
            return
        _show(models_table(rows))

    def ls(self, format: str = "table"):
        """Alias of list."""
        return self.list(format=format)

    def show(self, ref: Any, format: str = "text", template: bool = False):
        """Show a model: config summary, parameters, context length, chat template, files.

        Args:
            ref: model name (org/model) or folder path.
            format: text or json.
            template: print only the chat template.
        """
        from mrs import store

        _choice(format, "--format", ("text", "json"))
        path = store.resolve(_text(ref, "REF"), self._settings().home)
        info = store.model_info(path)
        if template:
            from mrs.tokenizer import Tokenizer

            text = Tokenizer(path).chat_template if (path / "tokenizer.json").is_file() else None
            if not text:
                raise MrsError(f"{info['name']} has no chat template")
            print(text)
            return
        info["execution"] = _execution(info, self._settings())
        if format == "json":
            return _print_json(info)
        _show(_show_table(path, info))

    def info(self, ref: Any, format: str = "text", template: bool = False):
        """Alias of show."""
        return self.show(ref, format=format, template=template)

    def rm(self, *refs: Any, yes: bool = False):
        """Remove models from the models directory (asks first unless --yes).

        Args:
            refs: one or more model names (org/model).
            yes: do not ask.
        """
        from mrs import store
        from mrs.render import human_bytes

        if not refs:
            raise UsageError("name the model(s) to remove, e.g. `mrs rm org/model`")
        home = self._settings().home
        names = [store.validate_name(_text(r, "REF")) for r in refs]
        sizes = {}
        for name in names:
            path = store.model_dir(home, name)
            if not path.is_dir():
                raise ModelNotFoundError(f"model '{name}' not found in {home}")
            sizes[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if not yes:
            listing = ", ".join(f"{n} ({human_bytes(sizes[n])})" for n in names)
            print(f"Remove {listing} from {home}? [y/N] ", end="", file=sys.stderr, flush=True)
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                raise MrsError("nothing removed (pass --yes to skip the question)")
        for name in names:
            store.remove(home, name)
            print(f"removed {name}")

    def cp(self, src: Any, dst: Any):
        """Copy a model to a new name (e.g. to keep a variant before changing it).

        Args:
            src: the model to copy (name or folder).
            dst: the new name (org/model); must not exist yet.
        """
        from mrs import store

        home = self._settings().home
        path = store.copy(home, _text(src, "SRC"), _text(dst, "DST"))
        print(f"copied {src} to {store.model_name(path)}")

    def quantize(self, src: Any, dst: Any, bits: Any = 4, group_size: Any = 64):
        """Write a quantized copy of a safetensors model in MLX's layout (mlx-community's):
        uint32-packed codes with per-group scales and biases, config.json's "quantization".
        mrs runs it quantized; so does mlx-lm.

        Args:
            src: the model to quantize (name or folder), dense safetensors.
            dst: the new model's name (org/model, in the models directory) or a folder path.
            bits: 4 or 8.
            group_size: inputs per scale: 32 or 64.
        """
        from mrs import quant_checkpoint, store

        bits = _int(bits, "--bits", 4)
        group_size = _int(group_size, "--group-size", 32)
        if bits not in (4, 8):
            raise UsageError(f"--bits must be 4 or 8, got {bits}")
        if group_size not in (32, 64):
            raise UsageError(f"--group-size must be 32 or 64, got {group_size}")
        home = self._settings().home
        source = store.resolve(_text(src, "SRC"), home)
        if source.is_file():
            raise UsageError(f"{source.name} is a GGUF file: it is already quantized (mrs runs it as it is)")
        dst = _text(dst, "DST")
        target = Path(dst).expanduser() if store.looks_like_path(dst) else store.model_dir(home, dst)
        counts = quant_checkpoint.write(source, target, bits, group_size)
        print(f"quantized {counts['quantized']} matrices to {bits}-bit g{group_size} "
              f"(kept {counts['kept']} tensors) into {target}")

    def verify(self, ref: Any):
        """Check a model's files against its SHA-256 manifest (.model_checksums); non-zero exit if any differ.

        Args:
            ref: model name or folder.
        """
        from mrs import store

        path = store.resolve(_text(ref, "REF"), self._settings().home)
        result = store.verify(path)
        print(f"ok: {result['checked']} files of {store.model_name(path)} match their SHA-256")
        if result["unlisted"]:
            print(f"note: not in the manifest: {', '.join(result['unlisted'])}", file=sys.stderr)

    def checksums(self, ref: Any, write: bool = False):
        """Print a model's SHA-256 manifest; --write (re)computes and records it.

        Args:
            ref: model name or folder.
            write: hash the files now and record the result (do this only when you trust the files).
        """
        from mrs import store

        path = store.resolve(_text(ref, "REF"), self._settings().home)
        manifest = store.read_checksums(path)
        if write or manifest is None:
            manifest = store.write_checksums(path, source=(manifest or {}).get("source"))
            print(f"wrote {path / store.CHECKSUMS}", file=sys.stderr)
        for name, entry in manifest["files"].items():
            print(f"{entry['sha256']}  {name}")

    # -- running ---------------------------------------------------------------------------

    def generate(self, prompt: Any, model: str = "", max_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.9, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 seed: int | None = None, system: str | None = None, stop: Any = None, raw: bool = False,
                 format: str = "text", json_mode: bool = False, adapter: Any = None):
        """Generate text for PROMPT and stream it to stdout.

        Args:
            prompt: the prompt text; '-' reads it from stdin.
            model: model folder path or org/name in the models directory (required).
            max_tokens: most new tokens to generate (default 256).
            temperature: sampling temperature; 0 is greedy (default 0.8).
            top_k: keep the K most likely tokens; 0 is off (default 40).
            top_p: nucleus sampling mass in (0, 1]; 1 is off (default 0.9).
            min_p: drop tokens below min_p x the top probability; 0 is off (default 0).
            repeat_penalty: penalty for recently seen tokens; 1 is off (default 1.0).
            seed: integer seed for repeatable sampling (default: random).
            system: a system message (uses the model's chat template).
            stop: a stop string; comma-separated for several.
            raw: send the prompt as-is, without the model's chat template.
            format: 'text' streams the text; 'json' prints one JSON object with text and stats.
            json_mode: constrain the answer to one JSON object (Ollama's format=json).
            adapter: a LoRA adapter folder (PEFT's format, e.g. from `mrs finetune`) merged in at load.
        """
        import mrs

        text = sys.stdin.read() if prompt == "-" else _text(prompt, "PROMPT")
        if format not in ("text", "json"):
            raise UsageError(f"--format must be text or json, got {format!r}")
        loaded = self._load(model, adapter)
        has_template = loaded.tokenizer is not None and loaded.tokenizer.chat_template
        if raw or not has_template:
            if system is not None and not raw:
                raise UsageError("--system needs a model with a chat template")
            request: Any = text
        else:
            request = ([{"role": "system", "content": _text(system, "--system")}] if system is not None else []) + \
                      [{"role": "user", "content": text}]
        stops = None if stop is None else _text(stop, "--stop").split(",")
        options = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                   "min_p": min_p, "repeat_penalty": repeat_penalty, "seed": seed, "stop": stops,
                   "format": "json" if json_mode else None}
        if format == "json":
            done = mrs.generate(loaded, request, **options)
            print(json.dumps({"model": loaded.name, "text": done.text, "finish_reason": done.finish_reason,
                              "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                              "tokens_per_second": round(done.tokens_per_second, 2)}))
            return
        for piece in mrs.stream(loaded, request, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    def chat(self, ref: Any = None, prompt: Any = None, system: Any = None, temperature: Any = None,
             top_p: Any = None, top_k: Any = None, max_tokens: Any = None, seed: Any = None, session: Any = None,
             save_on_exit: bool = False, stats: bool = False, model: Any = None, context: Any = None,
             adapter: Any = None):
        """Chat with a model in the terminal (markdown answers, slash commands; /help lists them).

        A conversation that outgrows the context drops its oldest turns (the system message
        stays) and says so in one dim line.

        Args:
            ref: model name (org/model), folder path or GGUF file; or give it as --model.
            prompt: answer this one message and exit instead of starting the REPL (with
                --model, the positional argument is this prompt).
            model: the model, as for generate (instead of REF).
            context: longest conversation in tokens (default 4096, at most the model's).
            system: a system message.
            temperature: sampling temperature; 0 is greedy (default 0.8).
            top_p: nucleus sampling mass in (0, 1] (default 0.9).
            top_k: keep the K most likely tokens; 0 is off (default 40).
            max_tokens: most tokens per answer (default 1024).
            seed: integer seed for repeatable answers.
            session: a session file: loaded at start if it exists.
            save_on_exit: save the conversation to --session when leaving.
            stats: print tokens, speed and prefilled tokens after each answer.
            adapter: a LoRA adapter folder merged into the model at load.
        """
        from mrs.chat import Chat, Conversation, parse_option
        from mrs.engine.session import ChatSession

        if model is not None:
            if ref is not None and prompt is not None:
                raise UsageError("give the model once: mrs chat REF [PROMPT] or mrs chat --model REF [PROMPT]")
            ref, prompt = model, ref if ref is not None else prompt
        if ref is None:
            raise UsageError("which model? mrs chat REF, or mrs chat --model REF")
        model_ref = _text(ref, "REF")
        max_len = None if context is None else _int(context, "--context", 2)
        if save_on_exit and session is None:
            raise UsageError("--save-on-exit needs --session FILE")
        session_file = None if session is None else Path(_text(session, "--session")).expanduser()
        conversation = Conversation()
        if session_file is not None and session_file.exists():
            conversation, _ = Conversation.load(session_file)
        flags = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_tokens": max_tokens, "seed": seed}
        for key, value in flags.items():
            if value is not None:
                conversation.options[key] = parse_option(key, str(value))
        if system is not None:
            conversation.system = _text(system, "--system")
        console = _console()
        loaded = self._load(model_ref, adapter)
        repl = Chat(loaded, load_model=self._load, console=console, conversation=conversation,
                    session_file=session_file, save_on_exit=save_on_exit, show_stats=stats,
                    make_session=lambda m: ChatSession(m, max_len=max_len))
        if prompt is not None:
            repl.ask(_text(prompt, "PROMPT"))
            if save_on_exit:
                conversation.save(session_file, loaded.name)
            return
        repl.run()

    def run(self, ref: Any = None, prompt: Any = None, system: Any = None, temperature: Any = None,
            top_p: Any = None, top_k: Any = None, max_tokens: Any = None, seed: Any = None, session: Any = None,
            save_on_exit: bool = False, stats: bool = False, model: Any = None, context: Any = None,
            adapter: Any = None):
        """Alias of chat."""
        return self.chat(ref, prompt=prompt, system=system, temperature=temperature, top_p=top_p, top_k=top_k,
                         max_tokens=max_tokens, seed=seed, session=session, save_on_exit=save_on_exit,
                         stats=stats, model=model, context=context, adapter=adapter)

    def embed(self, *texts: Any, model: Any = ""):
        """Embed texts with an embedding model; prints JSON {"model", "embeddings": [[...], ...]}.

        Args:
            texts: one or more texts; '-' reads one text per line from stdin.
            model: embedding model (e.g. a sentence-transformers BERT) name or folder (required).
        """
        items = [_text(t, "TEXT") for t in texts]
        if items == ["-"]:
            items = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not items:
            raise UsageError("give at least one TEXT to embed (or '-' to read lines from stdin)")
        try:
            from mrs.embedding import embed
        except ImportError as e:
            raise MrsError(f"embeddings are not available in this build ({e})") from e
        loaded = self._load(model)
        vectors = embed(loaded, items)
        print(json.dumps({"model": loaded.name, "embeddings": [[float(x) for x in row] for row in vectors]}))

    def perplexity(self, model: Any, file: Any, context: Any = 512, format: str = "text"):
        """Perplexity of a model over a text file, in windows of --context tokens (llama.cpp's method).

        Args:
            model: model name, folder or .gguf file.
            file: a UTF-8 text file ('-' reads stdin).
            context: tokens per window (default 512; half of each window is scored).
            format: text or json.
        """
        _choice(format, "--format", ("text", "json"))
        source = _text(file, "FILE")
        if source == "-":
            text = sys.stdin.read()
        else:
            try:
                text = Path(source).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"cannot read {source}: {e}") from e
        from mrs.evaluate import perplexity

        result = perplexity(self._load(_text(model, "MODEL")), text, context=_int(context, "--context", 4))
        if format == "json":
            return _print_json(result.to_dict())
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
              f"({result.windows} windows of {result.context}, {result.seconds:.1f}s)")

    def serve(self, model: Any = None, host: Any = None, port: Any = None, max_batch: Any = None,
              preload: bool = False, adapter: Any = None, coordinator: Any = None, num_processes: Any = None,
              process_id: Any = None):
        """Serve models over HTTP: the Ollama API (/api/*), the OpenAI API (/v1/*) and mrs's own routes.

        Args:
            model: default model(s), comma-separated: what a request naming no model gets, and
                what --preload loads (every model in the models directory is served either way).
            host: address to listen on (default 127.0.0.1, MRS_HOST).
            port: port (default 11434, MRS_PORT; 0 = any free port, printed when serving).
            max_batch: requests decoded together per model (default 8, MRS_MAX_BATCH).
            preload: load the models before accepting requests.
            adapter: a LoRA adapter folder: the one --model is served with it merged in.
            coordinator: HOST:PORT of process 0, to split each model over several processes (hosts)
                with --tensor-parallel: start the same command on each with its --process-id;
                process 0 serves HTTP, the others run what it runs (port + 1 carries that).
                "auto": jax.distributed finds the group (TPU slice, Slurm, Open MPI).
            num_processes: how many processes the group has.
            process_id: this process's number, 0 .. num_processes - 1.
        """
        from mrs import store

        refs = _refs(model, "--model")
        overrides = {
            "host": None if host is None else _text(host, "--host"),
            "port": None if port is None else _int(port, "--port", 0, 65535),
            "max_batch": None if max_batch is None else _int(max_batch, "--max-batch", 1),
        }
        if preload and not refs:
            raise UsageError("--preload needs --model (which models to load first)")
        lora = None
        if adapter is not None:
            if len(refs) != 1:
                raise UsageError("--adapter needs exactly one --model: the model it is served with")
            from mrs import adapters

            lora = Path(_text(adapter, "--adapter")).expanduser()
            adapters.read(lora)     # a bad folder fails now, not at the first request
        settings = self._settings(**overrides)
        for ref in refs:  # a typo fails now, not at the first request
            try:
                store.resolve(ref, settings.home)
            except ModelNotFoundError:
                from mrs import ollama_store

                if ollama_store.find(ref) is None:
                    raise
        group = None
        if (coordinator, num_processes, process_id) != (None, None, None):
            from mrs import distributed

            if coordinator == distributed.AUTO:
                group = distributed.Group(distributed.AUTO, num_processes, process_id)
            elif None in (coordinator, num_processes, process_id):
                raise UsageError("--coordinator, --num-processes and --process-id go together "
                                 "(or --coordinator auto alone)")
            else:
                count, number = _int(num_processes, "--num-processes", 2), _int(process_id, "--process-id", 0)
                group = distributed.Group(_text(coordinator, "--coordinator"), count, number)
        try:
            from mrs.server.app import serve
        except ImportError as e:
            raise MrsError(f"the HTTP server is not available in this build ({e})") from e
        if group is not None:
            import mrs
            from mrs import mirror

            group = distributed.join(group)
            if not group.leader:
                print(f"mrs process {group.process_id} of {group.num_processes} following {group.coordinator}",
                      file=sys.stderr, flush=True)
                mirror.follow(group, mrs.load)     # until the leader stops
                sys.stderr.flush()
                os._exit(0)     # as the leader does: jax's shutdown barrier would wait for it
            leader = mirror.Leader(group)
            code = 1
            try:
                serve(settings, models=refs, preload=preload, adapter=lora,
                      loader=lambda ref, **options: leader.load(mrs.load, ref, **options))
                code = 0
            finally:        # the followers leave with the leader; jax's shutdown barrier would wait for them
                leader.close()
                if code:
                    import traceback

                    traceback.print_exc()
                sys.stderr.flush()
                os._exit(code)
        serve(settings, models=refs, preload=preload, adapter=lora)

    def ps(self, url: Any = None, format: str = "table"):
        """Show the models loaded in a running mrs (or Ollama) server, via its /api/ps.

        Args:
            url: the server (default http://HOST:PORT from the settings).
            format: table or json.
        """
        import urllib.error
        import urllib.request

        from mrs.render import ps_table

        _choice(format, "--format", ("table", "json"))
        if url is None:
            settings = self._settings()
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
            url = f"http://{host}:{settings.port}"
        url = _text(url, "--url").rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://, got {url!r}")
        try:
            with urllib.request.urlopen(f"{url}/api/ps", timeout=10) as response:
                data = json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise MrsError(f"{url}/api/ps answered HTTP {e.code}; is that an mrs or Ollama server?") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MrsError(f"no server answering at {url} ({reason}); start one with `mrs serve`") from e
        except json.JSONDecodeError as e:
            raise MrsError(f"{url}/api/ps did not answer JSON; is that an mrs or Ollama server?") from e
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise MrsError(f"{url}/api/ps answered without a 'models' list")
        if format == "json":
            return _print_json(models)
        if not models:
            print("no models loaded", file=sys.stderr)
            return
        _show(ps_table(models))

    # -- settings --------------------------------------------------------------------------

    def config(self, action: str = "show", path: Any = None, force: bool = False):
        """Settings: show | sources | init | validate | env | path | cache | clear-cache.

        show: the effective settings as TOML. sources: each value and where it came from
        (default, config file, .env, environment, flag). init: write a commented config
        file. validate: check the config file. env: the MRS_* variables. path: where the
        config file is (MRS_CONFIG overrides). cache: where compiled steps persist
        (compile_cache, MRS_COMPILE_CACHE) and what they take. clear-cache: remove them
        (the next run of each model and shape compiles again).

        Args:
            action: show, sources, init, validate, env, path, cache or clear-cache.
            path: the config file for init/validate (default: the user config file).
            force: init overwrites an existing file.
        """
        from mrs import config as cfg

        _choice(action, "ACTION", ("show", "sources", "init", "validate", "env", "path", "cache", "clear-cache"))
        file = Path(_text(path, "--path")).expanduser() if path is not None else cfg.config_file()
        if action in ("cache", "clear-cache"):
            _compile_cache(self._settings().compile_cache_dir, clear=action == "clear-cache")
        elif action == "path":
            print(file)
        elif action == "init":
            print(f"wrote {cfg.init_file(file, force=force)}")
        elif action == "validate":
            problems = cfg.check_file(file)
            if problems:
                raise MrsError(f"{file}: " + "; ".join(problems))
            self._settings()  # the other layers (.env, MRS_*) must be valid too
            print(f"{file} is valid")
        elif action == "show":
            sys.stdout.write(cfg.render_toml(self._settings()))
        elif action == "sources":
            from rich.table import Table

            settings = self._settings()
            table = Table(box=None, pad_edge=False, header_style="bold")
            for column in ("SETTING", "VALUE", "SOURCE"):
                table.add_column(column)
            for line, name in zip(cfg.render_toml(settings).splitlines(), settings.as_dict(), strict=True):
                table.add_row(name, line.split(" = ", 1)[1], settings.sources.get(name, "default"))
            _show(table)
        elif action == "env":
            from rich.table import Table

            table = Table(box=None, pad_edge=False, header_style="bold")
            for column in ("VARIABLE", "VALUE", "SETS"):
                table.add_column(column)
            for row in cfg.env_rows():
                table.add_row(*row)
            _show(table)

    def version(self):
        """Print the mrs version."""
        import mrs

        print(mrs.__version__)



def _compile_cache(base: Path | None, clear: bool) -> None:
    """`mrs config cache` and `mrs config clear-cache` (no backend is imported)."""
    from mrs import compile_cache

    if base is None:
        print("the compile cache is off (compile_cache = off): every process compiles its steps")
        return
    if clear:
        freed = compile_cache.clear(base)
        print(f"removed {freed / 1e6:.1f} MB of compiled steps from {base}")
        return
    from rich.table import Table

    print(f"compiled steps persist in {base}")
    rows = compile_cache.summary(base)
    if not rows:
        print("(empty: the next run of each model and shape compiles, once)")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("WRITTEN BY", "FILES", "SIZE"):
        table.add_column(column)
    for name, files, size in rows:
        table.add_row(name, str(files), f"{size / 1e6:.1f} MB")
    _show(table)


def _execution(info: dict, settings: Any) -> str:
    """How `mrs.load` would run this model here: quantized (by which kernel) or dense."""
    from mrs import backends

    options = settings.load_options()
    gguf = info.get("format") in ("gguf", "quantized")
    if options.get("dequantize") or (not gguf and "quantize" not in options):
        return f"dense ({settings.dtype} weights)" if not gguf else "dequantized at load (--quantize none)"
    backend = backends.for_device(settings.device)
    kernel = getattr(backend, "quantized_kernel", lambda device: None)(settings.device)
    if kernel is None:
        why = getattr(backend, "quantized_kernel_reason", lambda device: None)(settings.device)
        return f"dequantized at load: {why or 'this backend runs no quantized weights'}"
    how = {"cpu": "mrs's CPU kernel", "xla": "dequantized inside each step, fused by XLA",
           "mlx": "MLX's quantized matmul"}[kernel]
    what = "its quantized weights" if gguf else f"{options['quantize']}, quantized at load"
    return f"quantized: {what} ({how})"


def _show_table(path: Path, info: dict):
    from rich.table import Table

    from mrs import store
    from mrs.render import ago, human_bytes

    if path.is_file():                      # a GGUF file: its metadata read as a config.json
        from mrs.gguf import GGUFModel

        config = GGUFModel(path).hf_config()
    else:
        config = store.read_json(path / "config.json")
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rows = [
        ("name", info["name"]),
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("parameters", f"{info['parameter_size']} ({info['parameters']:,})"),
        ("dtype", info["dtype"]),
        ("execution", info["execution"]),
        ("context length", str(info["context_length"] or "unlimited (recurrent)")),
        ("embedding length", str(info["embedding_length"] or "?")),
        ("layers", str(config.get("num_hidden_layers") or config.get("n_layer") or "?")),
        ("attention heads", "{} (kv {})".format(config.get("num_attention_heads", "?"),
                                                config.get("num_key_value_heads",
                                                           config.get("num_attention_heads", "?")))),
        ("vocabulary", str(config.get("vocab_size", "?"))),
        ("rope", str(rope.get("rope_type") or rope.get("type") or "default") if rope else "default"),
        ("chat template", "yes" if info["chat_template"] else "no"),
        ("size", human_bytes(info["size_bytes"])),
        ("modified", ago(info["modified"])),
        ("digest", info["digest"]),
        ("path", info["path"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    folder = path.parent if path.is_file() else path
    table.add_row("files", "\n".join(f"{f}  [dim]{human_bytes((folder / f).stat().st_size)}[/dim]"
                                     for f in info["files"]))
    return table


def _display(lines: list[str], out) -> None:
    """Fire's help printer, without its pager (help is short; a pager would hang scripts)."""
    out.write("\n".join(lines) + "\n")


GLOBAL_FLAGS = ("home", "device", "dtype", "quantize", "tensor_parallel", "verbose")


def _prepare(argv: list[str]) -> list[str]:
    """Check flags before Fire runs anything, and route help.

    Fire runs a command first and complains about a flag it could not use after, so a
    typo (`mrs pull x --revison v1`) would pull the wrong revision; here it fails first,
    in one line. ``-h`` always means help (Fire would read it as ``--home``), help
    without a command lists the commands, and ``-`` (stdin) reaches the command.
    """
    argv = ["--help" if a == "-h" else a for a in argv]
    if "--" in argv:
        head, tail = argv[: argv.index("--")], argv[argv.index("--"):]
    else:
        head, tail = argv, []
    command, i = None, 0
    while i < len(head):
        token = head[i]
        if token.startswith("--"):
            if token[2:].replace("-", "_") in GLOBAL_FLAGS[:-1]:
                i += 1  # its value is the next token
        elif not token.startswith("-") or token[1:].replace(".", "", 1).isdigit():
            command = token
            break
        i += 1
    if "-" in head:  # '-' means stdin here; Fire would take it for its call separator
        tail = (tail or ["--"]) + ["--separator=\x1f"]
        argv = head + tail
    if command is None:
        return [a for a in head if a != "--help"] + tail if "--help" in head else argv
    method = getattr(CLI, command, None)
    if command.startswith("_") or not callable(method):
        commands = sorted(n for n in dir(CLI) if not n.startswith("_") and callable(getattr(CLI, n)))
        raise UsageError(f"unknown command {command!r}; commands: {', '.join(commands)}")
    import inspect

    allowed = set(inspect.signature(method).parameters) | set(GLOBAL_FLAGS) | {"help"}
    for token in head[i + 1:]:
        if not token.startswith("--") or token == "--":
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in allowed and not (name.startswith("no") and name[2:] in allowed):
            raise UsageError(f"unknown flag --{name.replace('_', '-')} for `mrs {command}`; "
                             f"see `mrs {command} --help`")
    return argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mrs` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    fire.core.Display = _display
    from mrs import compile_cache

    compile_cache.set_reporter(compile_cache.terminal_reporter())   # a first compile says so
    try:
        fire.Fire(CLI, command=_prepare(sys.argv[1:] if argv is None else list(argv)), name="mrs")
    except fire.core.FireExit as e:
        return int(e.code or 0)
    except MrsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
