"""Stereo depth, one capability in one package: where each detected object is in 3D.

- calibration: the pair's calibration file (Middlebury calib.txt, OpenCV stereo YAML/XML)
  and its rectification maps;
- disparity: the disparity estimators (StereoSGBM, VPI), a registry by name;
- conversion: disparity -> depth in mm as a graph on the backend, and what is read from a
  depth map (`spatial`, the grid, files);
- source: the stereo:// source kind (two views per frame), registered with edge.sources;
- task: the depth task beside detection, built by the daemon when stereo.calib is set
  (not a card's task: no model, so not one of edge.tasks.KINDS);
- pair: one pair of image files to a depth map file (`edge depth`).
"""
