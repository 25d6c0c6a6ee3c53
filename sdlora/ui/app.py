"""The Gradio app: three pages wired onto `project`, `dataset_edit` and `training`.

Handlers return a message line instead of raising: a user mistake (UserError, ConfigError)
or a refused read/write (OSError) shows as one line in the page; anything else is a bug,
printed with its traceback on the terminal that runs `sdlora ui` and named in the page.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check over the network

import functools  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from sdlora.errors import USER_ERRORS  # noqa: E402
from sdlora.io import os_error_message  # noqa: E402
from sdlora.ui import dataset_edit, training  # noqa: E402
from sdlora.ui.project import (  # noqa: E402
    PRESETS,
    Project,
    apply_preset,
    check,
    form_fields,
    form_values,
    overrides,
    save,
)

MAX_UPLOAD = "64mb"  # per file; the builder's max_pixels limit is checked after the upload
THEME_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # system fonts: nothing fetched from a font CDN


def _problem(e: Exception) -> str:
    if isinstance(e, USER_ERRORS):
        return f"⚠️ {e}"
    if isinstance(e, OSError):
        return f"⚠️ {os_error_message(e)}"
    traceback.print_exc(file=sys.stderr)
    return f"⚠️ internal error ({type(e).__name__}): a bug in sdlora, not in your files; the traceback is in the terminal"


def guarded(n_outputs: int):
    """Run a handler; on failure the first output (the message line) says why and the others stay as they are."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
                message = _problem(e)
                return message if n_outputs == 1 else (message, *[gr.skip()] * (n_outputs - 1))
        return run
    return wrap


def build_app(root: str | Path) -> gr.Blocks:
    project = Project(root)
    fields = form_fields()

    def config_path(config: str) -> Path:
        return project.path(config, "config")

    # -- dataset page
    def dataset_outputs(cfg, note: str):
        data = dataset_edit.view(cfg)
        editable = [i for i in data.images if not i.subset.is_reg and i.duplicate_of is None]
        gallery = [(str(i.path), ", ".join(i.tags)) for i in editable]
        rejected = pd.DataFrame(data.rejected, columns=["file", "reason"])
        pairs = [(str(p), f"{'kept' if k == 0 else 'duplicate'}: {p.name}") for g in data.duplicate_groups
                 for k, p in enumerate(g)]
        freq = pd.DataFrame(list(data.tag_frequency.items())[:40], columns=["tag", "images"])
        if not data.built:
            note = note or "no dataset built yet: add images, then Build dataset"
        return note, gallery, rejected, pairs, freq, gr.update(interactive=dataset_edit.can_undo(cfg))

    n_dataset = 6

    @guarded(n_dataset)
    def show_dataset(config):
        if not config:
            return "choose a style, or create one", [], None, [], None, gr.update(interactive=False)
        return dataset_outputs(project.load(config), "")

    @guarded(n_dataset)
    def upload(config, files):
        cfg = project.load(config)
        uploads = [(Path(f).name, Path(f)) for f in files or []]
        if not uploads:
            return ("choose image files to upload first",) + (gr.skip(),) * (n_dataset - 1)
        added, refused = dataset_edit.add_images(cfg, uploads, log=lambda m: None)
        lines = [f"added {len(added)} image(s) to {project.relative(dataset_edit.training_folder(cfg))}"]
        lines += [f"⚠️ not added: {name}: {why}" for name, why in refused]
        return dataset_outputs(cfg, "\n\n".join(lines))

    @guarded(n_dataset)
    def add_folder(config, folder):
        cfg = project.load(config)
        added, refused = dataset_edit.add_folder(cfg, project.path(folder, "image folder"), log=lambda m: None)
        lines = [f"added {len(added)} image(s)"] + [f"⚠️ not added: {n}: {w}" for n, w in refused]
        return dataset_outputs(cfg, "\n\n".join(lines))

    @guarded(n_dataset)
    def build(config, retag):
        cfg = project.load(config)
        lines = []
        dataset_edit.build(cfg, retag=retag, log=lines.append)
        return dataset_outputs(cfg, "\n\n".join(lines[-6:]))

    @guarded(3)
    def select_image(config, evt: gr.SelectData):
        cfg = project.load(config)
        editable = [i for i in dataset_edit.view(cfg).images if not i.subset.is_reg and i.duplicate_of is None]
        item = editable[evt.index]
        return f"editing {project.relative(item.path)}", str(item.path), ", ".join(item.tags)

    @guarded(n_dataset)
    def save_tags(config, image, text):
        cfg = project.load(config)
        if not image:
            return ("click an image first, then edit its tags",) + (gr.skip(),) * (n_dataset - 1)
        path = dataset_edit.set_tags(cfg, project.path(image, "image"), text, log=lambda m: None)
        return dataset_outputs(cfg, f"saved the tags of {project.relative(path)}")

    @guarded(n_dataset)
    def bulk(config, operation, tag, new):
        cfg = project.load(config)
        n = dataset_edit.bulk_edit(cfg, operation, tag, new, log=lambda m: None)
        return dataset_outputs(cfg, f"{operation} '{tag}': {n} caption(s) changed")

    @guarded(n_dataset)
    def undo(config):
        cfg = project.load(config)
        n = dataset_edit.undo(cfg, log=lambda m: None)
        return dataset_outputs(cfg, f"undone: {n} caption(s) restored")

    @guarded(1)
    def create(name, trigger):
        path = project.create_style(name, trigger)
        return f"created {path}: add images on the Dataset page"

    # -- train page
    def form_dict(values) -> dict:
        return {f.key: v for f, v in zip(fields, values)}

    @guarded(1 + len(fields))
    def load_form(config):
        if not config:
            return (gr.skip(),) * (1 + len(fields))
        values = form_values(project, config)
        return (gr.skip(),) + tuple(values[f.key] for f in fields)  # the message line: the dataset page's

    @guarded(2)
    def check_form(config, *values):
        cfg = check(project, config, form_dict(values))
        changed = overrides(project, config, form_dict(values))
        try:
            summary = training.plan(cfg).text
        except USER_ERRORS as e:
            summary = f"the dataset is not ready: {e}"
        return (f"the config is valid{'; changed: ' + ', '.join(changed) if changed else ''}",
                summary.replace("\n", "\n\n"))

    @guarded(1 + len(fields))
    def preset(name, *values):
        changed = apply_preset(form_dict(values), name)
        return (f"preset {name}: {', '.join(PRESETS[name])} set in the form (Save config keeps them)",
                *[changed[f.key] for f in fields])

    @guarded(2)
    def speed(config, *values):
        cfg = check(project, config, form_dict(values))
        rate = training.measure_speed(cfg, project.root)
        return f"measured {1 / rate:.2f} steps/s on {cfg.model.base}", training.plan(cfg).text.replace("\n", "\n\n")

    @guarded(1)
    def save_form(config, *values):
        changed = save(project, config, form_dict(values))
        return f"saved {len(changed)} change(s) to {config}" if changed else "nothing changed"

    @guarded(1)
    def start(config, resume, *values):
        changes = overrides(project, config, form_dict(values))
        cfg = project.load(config, changes)
        total = training.plan(cfg).total_steps
        pid = training.start(cfg, config_path(config), changes, resume, project.root, total)
        return f"training started (pid {pid}){' from the saved state' if resume else ''}: it runs on if you close this tab"

    @guarded(1)
    def stop(config):
        pid = training.stop(project.load(config))
        return f"asked training pid {pid} to stop: it saves its state at the end of this step (Resume continues it)"

    @guarded(6)
    def live(config):
        if not config:
            return "", None, None, None, [], ""
        cfg = project.load(config)
        s = training.status(cfg)
        head = f"**{s.state}**"
        if s.step:
            head += f": step {s.step}" + (f" / {s.total}" if s.total else "") + (f", ETA {s.eta}" if s.eta else "")
        if s.message:
            head += f"\n\n⚠️ {s.message}"
        loss = pd.DataFrame(s.loss, columns=["step", "loss"]) if s.loss else None
        lr = pd.DataFrame([(step, v, name) for name, points in s.lr.items() for step, v in points],
                          columns=["step", "lr", "group"]) if s.lr else None
        val = pd.DataFrame(s.validation, columns=["step", "validation loss"])
        return head, loss, lr, val, [str(p) for p in s.previews], s.log_tail

    # -- results page
    @guarded(4)
    def show_results(config):
        if not config:
            return gr.skip(), [], gr.update(choices=[]), ""
        cfg = project.load(config)
        found = [project.relative(p) for p in training.adapters(cfg)]
        report = cfg.report_path.read_text(encoding="utf-8") if cfg.report_path.is_file() else "no report yet"
        report = "\n".join(line for line in report.splitlines() if not line.startswith("!["))  # images: below
        return gr.skip(), [(str(p), project.relative(p)) for p in training.grids(cfg)], \
            gr.update(choices=found, value=found[0] if found else None), report

    @guarded(2)
    def download(config, adapter):
        cfg = project.load(config)
        path = project.path(adapter, "adapter") if adapter else None
        if path is None or path not in training.adapters(cfg):
            return "choose an adapter of this style", None
        return f"{project.relative(path)} ready", str(path)

    @guarded(2)
    def sample(config, prompt, adapter, scale, seed, steps):
        cfg = project.load(config)
        path = project.path(adapter, "adapter") if adapter else None
        if path is not None and path not in training.adapters(cfg):
            return "choose an adapter of this style", gr.skip()
        if not prompt.strip():
            return "write a prompt first", gr.skip()
        images = training.sample(cfg, config_path(config), prompt, path, scale, seed, project.root,
                                 steps=int(steps) if steps else None)
        return f"{len(images)} image(s) in {project.relative(images[0].parent)}", [str(p) for p in images]

    @guarded(3)
    def epochs(config, steps):
        cfg = project.load(config)
        grids, rows = training.compare_epochs(cfg, config_path(config), project.root,
                                              steps=int(steps) if steps else None)
        table = pd.DataFrame(rows).round(3)
        return f"epochs side by side: {', '.join(project.relative(g) for g in grids)}", \
            [(str(p), project.relative(p)) for p in training.grids(cfg)], table

    theme = gr.themes.Default(font=THEME_FONTS, font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="sdlora", analytics_enabled=False) as app:
        app.sdlora_theme = theme
        gr.Markdown("## sdlora: dataset, training and results for one style")
        with gr.Row():
            configs = project.configs()
            config = gr.Dropdown(configs, value=configs[0] if configs else None, label="style config",
                                 allow_custom_value=True, elem_id="config", scale=3)
            refresh = gr.Button("Reload", elem_id="reload", scale=0)
            new_name = gr.Textbox(label="new style name", elem_id="new-name", scale=1)
            new_trigger = gr.Textbox(label="its trigger tag", elem_id="new-trigger", scale=1)
            create_btn = gr.Button("Create style", elem_id="create", scale=0)
        message = gr.Markdown(elem_id="message")

        with gr.Tab("Dataset", elem_id="tab-dataset"):
            with gr.Row():
                files = gr.File(file_count="multiple", label="upload images", elem_id="upload", type="filepath")
                with gr.Column():
                    upload_btn = gr.Button("Add uploaded images", elem_id="add-upload")
                    folder = gr.Textbox(label="or add every image of a folder (inside the project)", elem_id="folder")
                    folder_btn = gr.Button("Add folder", elem_id="add-folder")
                    retag = gr.Checkbox(label="re-tag images that have captions (old ones backed up)")
                    build_btn = gr.Button("Build dataset", variant="primary", elem_id="build")
            gallery = gr.Gallery(label="images (click one to edit its tags)", columns=6, height=420,
                                 elem_id="gallery", allow_preview=False)
            with gr.Row():
                image = gr.Textbox(label="image", interactive=False, elem_id="image")
                tags = gr.Textbox(label="tags (comma separated; the first is the trigger)", elem_id="tags", scale=3)
                save_btn = gr.Button("Save tags", elem_id="save-tags", scale=0)
            with gr.Row():
                operation = gr.Dropdown(list(dataset_edit.BULK_OPERATIONS), value="add", label="across the set",
                                        elem_id="bulk-op")
                bulk_tag = gr.Textbox(label="tag", elem_id="bulk-tag")
                bulk_new = gr.Textbox(label="replace with", elem_id="bulk-new")
                bulk_btn = gr.Button("Apply to every image", elem_id="bulk-apply")
                undo_btn = gr.Button("Undo last edit", elem_id="undo", interactive=False)
            freq = gr.BarPlot(x="tag", y="images", label="tag frequency (images carrying each tag)",
                              elem_id="freq", sort="-y", x_label_angle=-45)
            with gr.Row():
                rejected = gr.Dataframe(label="rejected images", elem_id="rejected", interactive=False)
                duplicates = gr.Gallery(label="near-duplicates (only the first of each group trains)", columns=4,
                                        elem_id="duplicates", height=240)
        dataset_out = [message, gallery, rejected, duplicates, freq, undo_btn]

        with gr.Tab("Train", elem_id="tab-train"):
            summary = gr.Markdown(elem_id="plan")
            with gr.Row():
                check_btn = gr.Button("Check config and plan", elem_id="check")
                save_cfg_btn = gr.Button("Save config", elem_id="save-config")
                resume = gr.Checkbox(label="resume from the saved state", elem_id="resume")
                start_btn = gr.Button("Start training", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Row():
                preset_name = gr.Dropdown(list(PRESETS), value=None, label="preset for the base family",
                                          elem_id="preset")
                preset_btn = gr.Button("Apply preset to the form", elem_id="apply-preset")
                speed_btn = gr.Button("Measure speed (sdlora bench, ~1 min)", elem_id="measure-speed")
            progress = gr.Markdown(elem_id="progress")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", label="training loss", elem_id="loss-plot")
                lr_plot = gr.LinePlot(x="step", y="lr", color="group", label="learning rate", elem_id="lr-plot")
            with gr.Row():
                val_table = gr.Dataframe(label="validation loss per epoch", elem_id="validation", interactive=False)
                preview_gallery = gr.Gallery(label="previews as they are written", columns=2, elem_id="previews",
                                             height=300)
            log_box = gr.Textbox(label="training log (last lines)", lines=8, elem_id="log", interactive=False)
            inputs = []
            sections = {}
            for f in fields:
                sections.setdefault(f.key.split(".")[0] if "." in f.key else "style", []).append(f)
            for section, group in sections.items():
                with gr.Accordion(f"[{section}]" if section != "style" else "style", open=section == "train"):
                    for f in group:
                        info = f"{f.help} (default {f.default!r}" + (f", min {f.min}" if f.min is not None else "") + \
                            (f", max {f.max}" if f.max is not None else "") + ")"
                        eid = "f-" + f.key.replace(".", "-").replace("_", "-")
                        if f.kind == "bool":
                            c = gr.Checkbox(label=f.key, info=info, elem_id=eid)
                        elif f.kind == "choice":
                            c = gr.Dropdown(f.choices, label=f.key, info=info, elem_id=eid)
                        elif f.kind in ("int", "float"):
                            c = gr.Number(label=f.key, info=info, precision=0 if f.kind == "int" else None,
                                          elem_id=eid)
                        else:
                            c = gr.Textbox(label=f.key + (" (TOML)" if f.kind == "toml" else ""), info=info,
                                           elem_id=eid)
                        inputs.append(c)

        with gr.Tab("Results", elem_id="tab-results"):
            grids = gr.Gallery(label="grids (click to zoom)", columns=3, height=480, elem_id="grids",
                               allow_preview=True)
            report = gr.Markdown(elem_id="report")
            with gr.Row():
                adapter = gr.Dropdown([], label="adapter", elem_id="adapter", scale=3)
                download_btn = gr.Button("Prepare download", elem_id="download")
                download_file = gr.File(label="download", elem_id="download-file", interactive=False)
            with gr.Row():
                prompt = gr.Textbox(label="prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:name:0.8>)",
                                    elem_id="prompt", scale=3)
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA scale", elem_id="scale")
                seed = gr.Number(1, precision=0, label="seed", elem_id="seed")
                steps = gr.Number(0, precision=0, label="steps (0: the config's)", elem_id="steps")
                sample_btn = gr.Button("Sample at the config's size", elem_id="sample")
            samples = gr.Gallery(label="samples", columns=2, elem_id="samples")
            with gr.Row():
                epochs_btn = gr.Button("Compare epochs (the config's prompts and seeds, every epoch's adapter)",
                                       elem_id="compare-epochs")
            figures = gr.Dataframe(label="style figures per epoch: colourfulness (Hasler-Suesstrunk) and hue/"
                                         "saturation distance to the style set (Hellinger; lower is closer)",
                                   elem_id="figures", interactive=False)

        timer = gr.Timer(3.0)
        create_btn.click(create, [new_name, new_trigger], [message])
        for trigger in (config.change, refresh.click):
            trigger(show_dataset, [config], dataset_out)
            trigger(load_form, [config], [message, *inputs])
            trigger(show_results, [config], [message, grids, adapter, report])
        app.load(show_dataset, [config], dataset_out)
        app.load(load_form, [config], [message, *inputs])
        app.load(show_results, [config], [message, grids, adapter, report])
        upload_btn.click(upload, [config, files], dataset_out)
        folder_btn.click(add_folder, [config, folder], dataset_out)
        build_btn.click(build, [config, retag], dataset_out)
        gallery.select(select_image, [config], [message, image, tags])
        save_btn.click(save_tags, [config, image, tags], dataset_out)
        bulk_btn.click(bulk, [config, operation, bulk_tag, bulk_new], dataset_out)
        undo_btn.click(undo, [config], dataset_out)
        check_btn.click(check_form, [config, *inputs], [message, summary])
        save_cfg_btn.click(save_form, [config, *inputs], [message])
        preset_btn.click(preset, [preset_name, *inputs], [message, *inputs])
        speed_btn.click(speed, [config, *inputs], [message, summary])
        start_btn.click(start, [config, resume, *inputs], [message])
        stop_btn.click(stop, [config], [message])
        timer.tick(live, [config], [progress, loss_plot, lr_plot, val_table, preview_gallery, log_box])
        download_btn.click(download, [config, adapter], [message, download_file])
        sample_btn.click(sample, [config, prompt, adapter, scale, seed, steps], [message, samples])
        epochs_btn.click(epochs, [config, steps], [message, grids, figures])
    app.sdlora_project = project
    return app


def serve(root: str | Path, port: int, listen: bool, log) -> int:
    """Serve the app until Ctrl-C; `log` gets the lines that say where (and, with `listen`, to whom)."""
    app = build_app(root)
    host = "0.0.0.0" if listen else "127.0.0.1"
    if listen:
        log("sdlora ui: warning: --listen serves on every network interface: anyone who can reach port "
            f"{port} can see the project's images and start trainings; there is no login")
    log(f"sdlora ui: serving {app.sdlora_project.root} on http://{host}:{port} (Ctrl-C stops the UI; "
        "trainings it started go on)")
    app.queue(default_concurrency_limit=4).launch(**launch_options(app, host, port))
    return 0


def launch_options(app: gr.Blocks, host: str, port: int) -> dict:
    """How the app is served: one place, shared by `serve` and the tests."""
    root = app.sdlora_project.root
    return dict(server_name=host, server_port=port, allowed_paths=[str(root)], max_file_size=MAX_UPLOAD,
                theme=app.sdlora_theme, ssr_mode=False, mcp_server=False, show_error=False, quiet=True,
                inbrowser=False, share=False, footer_links=[])
