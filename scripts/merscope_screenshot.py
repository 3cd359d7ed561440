import napari
from napari_diffst._reader import read_paths
v = napari.Viewer(show=True)
for data, kw, kind in read_paths("/work/shared/data/merscope_mouse_brain_mini"):
    if kw["name"].endswith("spots"):
        continue
    getattr(v, f"add_{kind}")(data, **kw)
v.reset_view()
v.screenshot("docs/images/merscope_dapi_transcripts.png", canvas_only=True)
print([l.name for l in v.layers])
v.close()
