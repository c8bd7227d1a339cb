camera { location <0, 2, -5> look_at <0, 0, 0> }
light_source { <2, 4, -3> color rgb 1 }
sphere { <sin(clock*2*pi), 0, 0>, 1 pigment { color rgb <1, clock, 0> } }
plane { y, -1 pigment { checker color rgb 1 color rgb 0.2 } }
