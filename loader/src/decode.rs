//! Image bytes to interleaved RGB8, deciding the format by content. JPEGs go through zune-jpeg (the
//! decoder the `image` crate itself uses: pure Rust, SIMD, no native library to install), grayscale is
//! expanded to three channels and CMYK/YCCK converted; anything else goes through the `image` crate.

use zune_jpeg::JpegDecoder;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;

/// Decodes into `out` (reused between calls); returns (width, height).
pub fn decode_rgb(bytes: &[u8], out: &mut Vec<u8>) -> Result<(u32, u32), String> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let options = DecoderOptions::default()
            .set_max_width(65_535)
            .set_max_height(65_535)
            .jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut d = JpegDecoder::new_with_options(std::io::Cursor::new(bytes), options);
        d.decode_headers()
            .map_err(|e| format!("JPEG header: {e}"))?;
        let (w, h) = d.dimensions().ok_or("JPEG without dimensions")?;
        let n = d.output_buffer_size().ok_or("JPEG output size unknown")?;
        if d.output_colorspace() != Some(ColorSpace::RGB) || n != w * h * 3 {
            return Err(format!(
                "JPEG decodes to {:?}, not RGB",
                d.output_colorspace()
            ));
        }
        out.resize(n, 0);
        d.decode_into(out)
            .map_err(|e| format!("JPEG decode: {e}"))?;
        Ok((w as u32, h as u32))
    } else {
        let img = image::load_from_memory(bytes)
            .map_err(|e| format!("image decode: {e}"))?
            .into_rgb8();
        let (w, h) = img.dimensions();
        out.clear();
        out.extend_from_slice(img.as_raw());
        Ok((w, h))
    }
}
